# shellcheck shell=bash
# DNS set-up (sourced by run.sh before meshgate starts): two HTTP echo backends on distinct
# loopback addresses, so `tasks.dnsweb` has two different A records.
$BIN/meshgate-echo --name d2 --http 127.0.0.2:28201 >"$WORK/d2.log" 2>&1 & PIDS+=($!)
$BIN/meshgate-echo --name d3 --http 127.0.0.3:28201 >"$WORK/d3.log" 2>&1 & PIDS+=($!)
