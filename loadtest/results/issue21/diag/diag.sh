#!/bin/bash
# The diagnosis of docs/benchmarks.md's `soak mixed`: `loadtest run mixed` at 180/s for 4 minutes on a
# fresh `braid serve` with /metrics on, and every 2 s the server's RSS and CPU ticks, the machine's
# I/O pressure (avg10) and the metrics of its HNSW graphs, merges, checkpoints and WAL fsyncs.
# (run1-metrics.log came from an earlier version that scraped braid_hnsw_rows and braid_hnsw_graphs only.)
cd "$(git rev-parse --show-toplevel)"
dir=$(mktemp -d /tmp/braid-diag-XXXXXX)
mport=$(python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python -m braid.service.cli serve --data-dir $dir/data \
  --models-dir bench/results/models --host 127.0.0.1 --port 0 --metrics-port $mport > $dir/server.log 2>&1 &
pid=$!
for _ in $(seq 1200); do grep -qE "serving braid\.v1\.Braid on" $dir/server.log && break; sleep 0.1; done
port=$(grep -oE "serving braid\.v1\.Braid on [0-9.]+:[0-9]+" $dir/server.log | grep -oE "[0-9]+$")
( t0=$(date +%s.%N); while kill -0 $pid 2>/dev/null; do
    now=$(date +%s.%N); rss=$(awk '/VmRSS/{print $2}' /proc/$pid/status); cpu=$(awk '{print $14+$15}' /proc/$pid/stat)
    m=$(curl -s 127.0.0.1:$mport/metrics | grep -E "^braid_hnsw_graphs|^braid_checkpoints|^braid_checkpoint_duration_seconds_(sum|count)|^braid_wal_fsync_seconds_(sum|count)|^braid_merges" | tr '\n' ' ')
    echo "$(python3 -c "print(round($now-$t0,1))") rss_kb=$rss cpu_ticks=$cpu io=$(head -1 /proc/pressure/io | cut -d" " -f2) $m"; sleep 2; done ) > ${METRICS_LOG:-/tmp/braid-diag-metrics.log} 2>&1 &
.venv/bin/python -m loadtest run mixed --rate 180 --duration 4m --address 127.0.0.1:$port --server-pid $pid --recreate \
  --out loadtest/results/issue21/diag --quiet > ${RUN_LOG:-/tmp/braid-diag-run.log} 2>&1
kill $pid; wait $pid 2>/dev/null
rm -rf $dir
