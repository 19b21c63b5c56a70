"""The docs are checked against the code, so that they stay true: the configuration reference
page equals what the dataclasses generate; every ``python -m jocor_ddp.X --flag`` written in
README.md and docs/ names a command that exists and a flag its parser accepts; every relative
link and anchor resolves; every config and sweep file named exists and validates."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path


from jocor_ddp.config import load_config
from jocor_ddp.grid import load_sweep
from jocor_ddp.reference import config_reference, generated_block, keys

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200


def text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


# --- the configuration reference ---------------------------------------------------------

def row_keys(block: str) -> dict[str, str]:
    """Key -> its table row, from a generated block."""
    return {m.group(1): line for line in block.splitlines() if (m := re.match(r"\| `([\w.]+)` \|", line))}


def reference_drift(page_block: str, code_block: str) -> list[str]:
    """The keys whose rows differ between the page and the code, by name."""
    page, code = row_keys(page_block), row_keys(code_block)
    problems = [f"{k}: in the code, not on the page" for k in code if k not in page]
    problems += [f"{k}: on the page, not in the code" for k in page if k not in code]
    problems += [f"{k}: the page says {page[k]!r}, the code {code[k]!r}" for k in code if k in page and page[k] != code[k]]
    if not problems and page_block != code_block:
        problems.append("the rows agree, but the order or the text around them differs")
    return problems


def test_the_config_page_is_what_the_code_generates():
    drift = reference_drift(generated_block(text(REPO / "docs" / "config.md")), config_reference())
    assert not drift, ("docs/config.md differs from the config dataclasses; run "
                       "`python -m jocor_ddp.train --config-reference docs/config.md`:\n" + "\n".join(drift))


def test_a_changed_default_is_named():
    """The check itself: a page with one default changed fails by the key's name."""
    code = config_reference()
    edited = code.replace("| `train.lr` | float | `0.001` |", "| `train.lr` | float | `0.01` |")
    assert edited != code
    (problem,) = reference_drift(edited, code)
    assert problem.startswith("train.lr: the page says")
    assert reference_drift(code.replace("| `log.tensorboard`", "| `log.tensorboardx`"), code)[0].startswith(
        "log.tensorboard: in the code, not on the page")


def test_every_key_has_a_meaning_and_a_type():
    for k in keys():
        assert k.meaning, f"{k.key}: no comment above the field in jocor_ddp/config.py"
        assert k.type and k.default, k.key


# --- commands and flags ------------------------------------------------------------------

COMMAND = re.compile(r"(?:python3?|torchrun[^`\n]*?)\s+-m\s+jocor_ddp\.(\w+)((?:[^\n`|;&#]|\\\n)*)")


def commands(page_text: str) -> list[tuple[str, list[str]]]:
    """(module, the words after it) for each ``-m jocor_ddp.X`` in a page; a line ending in
    a backslash continues."""
    out = []
    for m in COMMAND.finditer(page_text):
        rest = m.group(2).replace("\\\n", " ")
        try:
            words = shlex.split(rest, comments=False)
        except ValueError:  # an unbalanced quote in prose: the plain words will do
            words = rest.split()
        out.append((m.group(1), words))
    return out


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(module: str) -> argparse.ArgumentParser:
    """The module's own parser, caught as it parses (nothing runs)."""
    mod = importlib.import_module(f"jocor_ddp.{module}")
    original = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        raise _Captured(self)
    argparse.ArgumentParser.parse_args = capture
    try:
        mod.parse_args([])
    except _Captured as got:
        return got.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"jocor_ddp.{module}.parse_args built no parser")


def unknown_flags(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """The --flags among ``words`` that the parser (or the subcommand named) does not take."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subparsers:
        sub = next((w for w in words if w in subparsers[0].choices), None)
        if sub is not None:
            parser = subparsers[0].choices[sub]
    known = set(parser._option_string_actions)
    return [w for w in (w.split("=", 1)[0] for w in words if w.startswith("--")) if w not in known]


def test_every_command_and_flag_in_the_docs_exists():
    seen = 0
    for page in PAGES:
        for module, words in commands(text(page)):
            seen += 1
            assert (REPO / "jocor_ddp" / f"{module}.py").is_file(), f"{page.name}: python -m jocor_ddp.{module}: no such command"
            bad = unknown_flags(parser_of(module), words)
            assert not bad, f"{page.name}: python -m jocor_ddp.{module} {' '.join(words)}: unknown flag(s) {bad}"
    assert seen > 20  # the docs do show commands


def test_a_wrong_flag_is_caught():
    (module, words), = commands("run `python -m jocor_ddp.bench data --shards S --wokers 1,2` now")
    assert unknown_flags(parser_of(module), words) == ["--wokers"]
    (module, words), = commands("python -m jocor_ddp.prepare clothing1m --src A \\\n    --out B --resize 256")
    assert module == "prepare" and unknown_flags(parser_of(module), words) == []


# --- links, anchors and the files the docs name ------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    s = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", s).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    body = re.sub(r"```.*?```", "", text(page), flags=re.S)  # no headings inside code blocks
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", body, flags=re.M)}


def broken_links(page: Path) -> list[str]:
    body = re.sub(r"```.*?```", "", text(page), flags=re.S)
    problems = []
    for target in LINK.findall(body):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{page.name}: {target}: {path} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{page.name}: {target}: no heading #{anchor} in {dest.name}")
    return problems


def test_every_relative_link_and_anchor_resolves():
    problems = [p for page in PAGES for p in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title, `test_x.py`\n\n[ok](#a-title-test_xpy) [gone](#no-such) [file](missing.md) "
                    "[web](https://example.org)\n")
    assert broken_links(page) == ["page.md: #no-such: no heading #no-such in page.md",
                                  "page.md: missing.md: missing.md does not exist"]


def named_files(pattern: str) -> set[str]:
    return {m for page in PAGES for m in re.findall(pattern, text(page))}


def test_every_config_and_sweep_file_named_exists_and_validates():
    configs = named_files(r"\bconfigs/[\w]+\.yaml\b")
    sweeps = named_files(r"\bconfigs/sweeps/[\w]+\.yaml\b")
    assert configs and sweeps
    for name in sorted(configs):
        assert (REPO / name).is_file(), f"the docs name {name}, which does not exist"
        load_config(str(REPO / name))
    for name in sorted(sweeps):
        assert (REPO / name).is_file(), f"the docs name {name}, which does not exist"
        load_sweep(REPO / name)


def test_the_readme_is_a_front_page():
    lines = text(REPO / "README.md").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the manual belongs in docs/"
    for page in (REPO / "docs").glob("*.md"):
        assert f"docs/{page.name}" in "\n".join(lines), f"README.md's docs map does not list docs/{page.name}"


# --- the layers docs/architecture.md describes ---------------------------------------------

def documented_layers() -> dict[str, int]:
    """Module (top-level name in the package) -> its layer, from architecture.md's table."""
    layers = {}
    for m in re.finditer(r"^\| (\d+) \| ((?:`\w+`(?:, )?)+) \|", text(REPO / "docs" / "architecture.md"), flags=re.M):
        for name in re.findall(r"`(\w+)`", m.group(2)):
            layers[name] = int(m.group(1))
    return layers


def package_imports() -> list[tuple[str, str, str]]:
    """(importing file, importing module, imported module) for every import between the
    package's top-level modules and packages, function-level imports included."""
    import ast
    root = REPO / "jocor_ddp"
    out = []
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root).with_suffix("").parts
        src, package = parts[0], list(parts[:-1])
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
                # `from . import config`: the names are the modules; `from . import __version__`: the package
                targets = [base[0]] if base else [a.name if (root / f"{a.name}.py").is_file() or (root / a.name).is_dir()
                                                  else "__init__" for a in node.names]
            elif node.module and node.module.startswith("jocor_ddp."):
                targets = [node.module.split(".")[1]]
            else:
                continue
            out += [(str(f.relative_to(REPO)), src, t) for t in targets if t != src]
    return out


def layer_violations(layers: dict[str, int]) -> list[str]:
    return [f"{path}: {src} (layer {layers.get(src)}) imports {dst} (layer {layers.get(dst)})"
            for path, src, dst in package_imports()
            if src not in layers or dst not in layers or layers[dst] >= layers[src]]


def test_imports_go_down_the_documented_layers():
    layers = documented_layers()
    modules = {p.stem if p.is_file() else p.name for p in (REPO / "jocor_ddp").iterdir()
               if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert modules <= set(layers), f"not in docs/architecture.md's layer table: {sorted(modules - set(layers))}"
    assert not layer_violations(layers), "\n".join(layer_violations(layers))


def test_an_upward_import_is_caught():
    layers = documented_layers()
    layers["dist"] = layers["trainer"]  # pretend dist sat above what imports it
    assert any("imports dist" in v for v in layer_violations(layers))
