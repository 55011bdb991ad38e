#!/bin/bash
# Where can a probe read malloc's return value most cheaply? (issue 15, BENCHMARKS.md §7)
#
# Times a malloc(32)+free loop under kernel uprobes placed through tracefs (the same trap
# machinery the BPF probes use; every variant records the same kind of trace event, so the
# differences are the traps): nothing; an entry probe; entry + uretprobe (the kernel's return
# trampoline); entry + a probe on each RET instruction of malloc (found with objdump); and one
# probe on malloc's first instruction that is neither a `push` nor a RET (a `mov`), to tell
# whether a RET costs for being a RET or for being single-stepped. Root; glibc's libc.so.6 on x86_64.
#
#   sudo xtask/experiments/return-points.sh [REPS] [CALLS]
set -euo pipefail
reps=${1:-5}; calls=${2:-200000}
T=/sys/kernel/tracing; L=$(readlink -f /lib/x86_64-linux-gnu/libc.so.6)
work=$(mktemp -d); trap 'echo > $T/uprobe_events 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/loop.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    void *volatile sink;
    for (int i = 0; i < 1000; i++) { sink = malloc(32); free(sink); }
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) { sink = malloc(32); free(sink); }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.0f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
C
gcc -O2 -o "$work/loop" "$work/loop.c"
hex() { printf '0x%x' "$1"; }
entry=$((16#$(nm -D --defined-only "$L" | awk '$3 ~ /^malloc(@@.*)?$/ {print $1}')))
size=$(nm -D -S --defined-only "$L" | awk '$4 ~ /^malloc(@@.*)?$/ {print $2}')
end=$((entry + 16#$size))
disasm=$(objdump -d --no-show-raw-insn --start-address=$(hex $entry) --stop-address=$(hex $end) "$L")
rets=$(awk '$2 == "ret" || $2 == "retq" {sub(":", "", $1); print "0x" $1}' <<<"$disasm")
# The first instruction that is not a `push` (the kernel emulates `push`; most others it
# single-steps out of line), and not a RET either.
second=$(awk '/^ +[0-9a-f]+:/ && $2 != "push" && !done {sub(":", "", $1); print "0x" $1; done = 1}' <<<"$disasm")
echo "libc $L: malloc at $(hex $entry), RETs at" $rets", first non-push instruction at $second" >&2
set_probes() {
    echo > $T/uprobe_events
    case $1 in
        none) return ;;
        entry) echo "p:awx/e $L:$(hex $entry)" >> $T/uprobe_events ;;
        uretprobe) echo "p:awx/e $L:$(hex $entry)" >> $T/uprobe_events
            echo "r:awx/r $L:$(hex $entry)" >> $T/uprobe_events ;;
        ret-insns) echo "p:awx/e $L:$(hex $entry)" >> $T/uprobe_events
            i=0; for o in $rets; do echo "p:awx/r$i $L:$o" >> $T/uprobe_events; i=$((i+1)); done ;;
        non-push-insn) echo "p:awx/s $L:$second" >> $T/uprobe_events ;;
    esac
    echo 1 > $T/events/awx/enable
}
variants="none entry uretprobe ret-insns non-push-insn"
declare -A runs
for r in $(seq "$reps"); do
    for v in $variants; do
        set_probes "$v"
        runs[$v]+="$("$work/loop" "$calls") "
        [ "$v" = none ] || echo 0 > $T/events/awx/enable
        echo > $T/uprobe_events
    done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
base=$(median <<<"${runs[none]}")
e=$(( $(median <<<"${runs[entry]}") - base ))
echo "| probes on malloc (tracefs) | ns per malloc+free: median of $reps | ns added | × entry probe |"
echo "| --- | --- | --- | --- |"
for v in $variants; do
    m=$(median <<<"${runs[$v]}")
    echo "| $v | $m (${runs[$v]% }) | $((m - base)) | $(awk -v a=$((m - base)) -v b=$e 'BEGIN {printf "%.2f", a / b}') |"
done
