#!/bin/bash
# The before/after runs of docs/benchmarks.md "Issue 21: mixed and bulk re-run": one fresh
# `braid serve` on loopback per call, either the checkout as it is ("after") or the code before issue 21
# ("before": index/, service/, encoders/ and proto/ of commit 1fe9fbb, the protos compiled,
# laid out as the `braid` package first on PYTHONPATH), then the same loadtest command
# against it with --address/--recreate. The loadtest client is always the checkout's.
#
#   loadtest/results/issue21/ab.sh before|after SCENARIO LOADTEST-COMMAND [ARGS...]
#   loadtest/results/issue21/ab.sh before bulk run --rate 50 --duration 20s
#   loadtest/results/issue21/ab.sh after mixed find-max --start 25
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
label=$1 scen=$2
shift 2
before=${BEFORE_DIR:-/tmp/braid-before-1fe9fbb}
if [ "$label" = before ] && [ ! -d "$before/braid/index" ]; then
  rm -rf "$before" && mkdir -p "$before/src" "$before/braid"
  git archive 1fe9fbb proto index service encoders | tar -x -C "$before/src"
  (cd "$before/src" && "$OLDPWD/.venv/bin/python" -c "
import glob; from pathlib import Path; from grpc_tools import protoc
inc = str(Path(protoc.__file__).parent / '_proto')
protos = glob.glob('proto/braid/v1/*.proto') + glob.glob('proto/braid/cluster/v1/*.proto')
raise SystemExit(protoc.main(['protoc', '-Iproto', f'-I{inc}', '--python_out=proto', '--pyi_out=proto', '--grpc_python_out=proto', *protos]))")
  cp -r "$before/src/proto/braid/." "$before/braid/"
  for part in service index encoders; do cp -r "$before/src/$part" "$before/braid/$part"; done
fi
dir=$(mktemp -d /tmp/braid-ab-XXXXXX)
pythonpath=""
[ "$label" = before ] && pythonpath=$before
PYTHONPATH=$pythonpath PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python -m braid.service.cli serve \
  --data-dir "$dir/data" --models-dir bench/results/models --host 127.0.0.1 --port 0 >"$dir/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1200); do grep -qE "serving braid\.v1\.Braid on" "$dir/server.log" && break; sleep 0.1; done
port=$(grep -oE "serving braid\.v1\.Braid on [0-9.]+:[0-9]+" "$dir/server.log" | grep -oE "[0-9]+$")
echo "[$label $scen] server pid $pid port $port loadavg $(cat /proc/loadavg)"
.venv/bin/python -m loadtest "$@" "$scen" --address "127.0.0.1:$port" --server-pid "$pid" --recreate \
  --out loadtest/results/issue21/ab --quiet
echo "[$label $scen] end loadavg $(cat /proc/loadavg)"
