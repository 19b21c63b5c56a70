# shellcheck shell=bash
# Start and stop a Docker engine for the image test (sourced by .ci/run).
#   docker_engine_start: installs Debian's docker.io and debootstrap where missing, starts
#     dockerd in the background unless an engine already answers, and waits for it (60 s);
#     returns 1, with the reason on stderr, when there is none.
#   docker_engine_stop: stops the engine that docker_engine_start started, and only that one.

_jocor_dockerd_pid=""

docker_engine_start() {
  if ! command -v dockerd > /dev/null || ! command -v debootstrap > /dev/null; then
    if [[ $(id -u) != 0 ]] || ! command -v apt-get > /dev/null; then
      echo "engine.sh: dockerd or debootstrap is missing and cannot be installed here (needs root and apt)" >&2
      return 1
    fi
    echo "engine.sh: installing docker.io and debootstrap (Debian packages)"
    local apt_log=${TMPDIR:-/tmp}/jocor-apt-docker.log
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap) > "$apt_log" 2>&1 \
      || { tail -5 "$apt_log" >&2; echo "engine.sh: apt-get could not install docker.io" >&2; return 1; }
  fi
  if docker info > /dev/null 2>&1; then
    echo "engine.sh: using the Docker engine that is already running"
    return 0
  fi
  if [[ $(id -u) != 0 ]]; then echo "engine.sh: no Docker engine runs, and starting one needs root" >&2; return 1; fi
  local log=${TMPDIR:-/tmp}/jocor-dockerd.log
  dockerd > "$log" 2>&1 &
  _jocor_dockerd_pid=$!
  for _ in $(seq 60); do
    if docker info > /dev/null 2>&1; then
      echo "engine.sh: dockerd $(docker info --format '{{.ServerVersion}}') started (log: $log)"
      return 0
    fi
    if ! kill -0 "$_jocor_dockerd_pid" 2> /dev/null; then break; fi
    sleep 1
  done
  echo "engine.sh: dockerd did not start; the end of its log:" >&2
  tail -5 "$log" >&2
  docker_engine_stop
  return 1
}

docker_engine_stop() {
  if [[ -n $_jocor_dockerd_pid ]] && kill -0 "$_jocor_dockerd_pid" 2> /dev/null; then
    kill "$_jocor_dockerd_pid"
    for _ in $(seq 30); do kill -0 "$_jocor_dockerd_pid" 2> /dev/null || break; sleep 1; done
    echo "engine.sh: dockerd stopped"
  fi
  _jocor_dockerd_pid=""
}
