#!/usr/bin/env bash
# Boot the ferry test guest under QEMU/KVM and check its serial protocol.
#
#   crates/testguest/run-qemu.sh [guest command line]
#
# Environment knobs:
#   ELF=path       guest image (default: build with cargo and use OUT_DIR's)
#   SMP=2 MEM=256  vCPUs / MiB of RAM
#   PVH=1          boot through the PVH note (a copy with the Multiboot magic
#                  wiped, since QEMU prefers Multiboot when both are present)
#   SEND="s v"     bytes sent to COM1 after READY (space separated, 0.5 s apart)
#   RUN=2          seconds to let the guest run before sending 'p'
#   TIMEOUT=60     hard limit for the whole QEMU run
#   ACCEL=kvm      or tcg
# Output: COM1 on stdout (heartbeat dots stripped), then a summary with
# heartbeat rate measured on COM2 and timings from QEMU start.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cmdline=${1:-mode=run dirty=16}
SMP=${SMP:-2}
MEM=${MEM:-256}
RUN=${RUN:-2}
TIMEOUT=${TIMEOUT:-60}
SEND=${SEND:-s v}
ACCEL=${ACCEL:-kvm}

work=$(mktemp -d /tmp/ferry-testguest.XXXXXX)
qpid=
cleanup() {
    if [[ -n $qpid ]] && kill -0 "$qpid" 2>/dev/null; then kill "$qpid" 2>/dev/null || true; fi
    exec 3>&- 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap '' PIPE   # the guest may power off before we are done writing to it

if [[ -z ${ELF:-} ]]; then
    (cd "$here" && cargo build -q -p ferry-testguest --message-format=json) >"$work/build.json"
    outdir=$(grep -o '"out_dir":"[^"]*ferry-testguest[^"]*"' "$work/build.json" | tail -1 | cut -d'"' -f4)
    ELF=$outdir/ferry-testguest.elf
fi
[[ -f $ELF ]] || { echo "no guest image at $ELF" >&2; exit 1; }

img=$work/guest.elf
cp "$ELF" "$img"
if [[ ${PVH:-0} == 1 ]]; then
    # The Multiboot header sits at file offset 0x1000 (start of the PT_LOAD).
    magic=$(od -An -tx4 -j $((0x1000)) -N4 "$img" | tr -d ' ')
    [[ $magic == 1badb002 ]] || { echo "multiboot magic not at 0x1000 ($magic)" >&2; exit 1; }
    printf '\0\0\0\0' | dd of="$img" bs=1 seek=$((0x1000)) conv=notrunc status=none
fi

mkfifo "$work/in"
now_ms() { date +%s%3N; }
t0=$(now_ms)
timeout "$TIMEOUT" qemu-system-x86_64 -accel "$ACCEL" -cpu host,-arch-capabilities \
    -m "$MEM" -smp "$SMP" -kernel "$img" -append "$cmdline" \
    -serial stdio -serial "file:$work/hb.txt" \
    -display none -no-reboot -nodefaults -monitor none \
    <"$work/in" >"$work/com1.txt" 2>"$work/qemu.err" &
qpid=$!
exec 3>"$work/in"

# Wait for READY / EXIT / first heartbeat.
t_ready= t_hb= t_banner=
while kill -0 "$qpid" 2>/dev/null; do
    [[ -z $t_banner ]] && grep -q '^ferry-testguest' "$work/com1.txt" 2>/dev/null && t_banner=$(now_ms)
    [[ -z $t_hb && -s $work/hb.txt ]] && t_hb=$(now_ms)
    if grep -qE '^(READY|EXIT|ERROR|FAULT|PANIC)' "$work/com1.txt" 2>/dev/null; then
        t_ready=$(now_ms); break
    fi
    sleep 0.01
done

if [[ -n $t_ready ]] && grep -q '^READY' "$work/com1.txt"; then
    sleep 0.5
    [[ -z $t_hb && -s $work/hb.txt ]] && t_hb=$(now_ms)
    hbf=$work/hb.txt
    [[ " $cmdline " == *" hb=1 "* ]] && hbf=$work/com1.txt
    dots() { tr -cd '.' <"$hbf" | wc -c; }
    h1=$(dots); s1=$(now_ms)
    sleep "$RUN"
    h2=$(dots); s2=$(now_ms)
    for c in $SEND; do printf '%s' "$c" >&3 2>/dev/null || true; sleep 0.5; done
    printf 'p' >&3 2>/dev/null || true
fi
# Give QEMU a moment to power off by itself.
for _ in $(seq 100); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.05; done
t_end=$(now_ms)
still_running=0
if kill -0 "$qpid" 2>/dev/null; then still_running=1; kill "$qpid" 2>/dev/null || true; fi
wait "$qpid" 2>/dev/null && rc=0 || rc=$?
qpid=

tr -d '.' <"$work/com1.txt"
echo "---"
echo "qemu exit: rc=$rc$([[ $still_running == 1 ]] && echo ' (had to be killed)')"
[[ -s $work/qemu.err ]] && sed 's/^/qemu: /' "$work/qemu.err"
[[ -n $t_banner ]] && echo "banner after $((t_banner - t0)) ms"
[[ -n $t_ready ]] && echo "READY/EXIT after $((t_ready - t0)) ms"
[[ -n $t_hb ]] && echo "first heartbeat seen after <= $((t_hb - t0)) ms"
if [[ -n ${s2:-} ]]; then
    echo "heartbeats: $((h2 - h1)) in $((s2 - s1)) ms ($(((h2 - h1) * 1000 / (s2 - s1)))/s)"
fi
echo "total $((t_end - t0)) ms"
