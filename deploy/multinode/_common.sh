# Sourced by the multi-node scripts (`. _common.sh "$@"`): CONFIG and OVERRIDES from the arguments, values of
# the resolved config, tcp address parts, and the dry-run mode: with MINIRL_DRY_RUN=1 every service command
# is printed as one line "[dry-run] CMD ARGS..." (shell-quoted) instead of being run.
CONFIG="${1:?usage: $(basename "$0") CONFIG [key=value ...]}"; shift
OVERRIDES=("$@")
die() { echo "[$(basename "$0")] $*" >&2; exit 2; }

# cfg KEY... : values of the resolved config (CONFIG < OVERRIDES, what the services will see), space-separated.
# Use as V="$(cfg a.b c.d)"; read -r A C <<<"$V"  (so that a config error stops the script).
cfg() { python - "$CONFIG" "$*" "${OVERRIDES[@]}" <<'PY'
import sys
from minirl_async.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[3:])
except ConfigError as e:
    sys.exit(f"config error: {e}")
values = []
for key in sys.argv[2].split():
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    values.append(str(value))
print(" ".join(values))
PY
}

# tcp://HOST:PORT -> HOST, PORT (a multi-node run cannot use ipc:// or loopback-only addresses)
addr_host() { [[ "$1" == tcp://*:* ]] || die "$1 is not tcp://HOST:PORT"; local a="${1#tcp://}"; echo "${a%:*}"; }
addr_port() { [[ "$1" == tcp://*:* ]] || die "$1 is not tcp://HOST:PORT"; echo "${1##*:}"; }

# An env var that must agree with the config, if set at all: same_as_config NAME VALUE KEY
same_as_config() {
    local given="${!1:-}"
    [ -z "$given" ] || [ "$given" = "$2" ] || die "$1=$given but $3 = $2 in the resolved config; set $3 (in the \
config or as the override $3=$given) instead of $1"
}

dry_run() { [ "${MINIRL_DRY_RUN:-0}" = 1 ]; }
show() { local line; printf -v line ' %q' "$@"; echo "[dry-run]$line"; }
# run CMD... : replace this shell with CMD.  start CMD... : CMD in the background (stopped with this script).
run() { if dry_run; then show "$@"; else exec "$@"; fi; }
PIDS=()
start() { if dry_run; then show "$@"; else "$@" & PIDS+=("$!"); fi; }
stop_all() { if [ ${#PIDS[@]} -gt 0 ]; then kill -TERM "${PIDS[@]}" 2>/dev/null || true; fi; wait || true; }
