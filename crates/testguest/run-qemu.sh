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
#   SEND="s v"     bytes sent to COM1 after READY (space separated, 0.5 s apart);
#                  a token @RE waits (up to TIMEOUT) until a COM1 line
#                  matches the extended regex RE (use . for spaces)
#   RUN=2          seconds to let the guest run before sending 'p'
#   TIMEOUT=60     hard limit for the whole QEMU run
#   ACCEL=kvm      or tcg
# virtio (QEMU microvm with modern virtio-mmio; it has no COM2, so use hb=0
# or hb=1 there; the eight microvm transports are announced to the guest
# with virtio_mmio.device= tokens appended to the command line):
#   MICROVM=1      boot a microvm instead of a pc (implied by DISK / NET)
#   DISK=path      attach a virtio-blk disk (created sparse if missing,
#                  DISK_MB=256), serial "ferrydisk"
#   NET=1          attach virtio-net (slirp) forwarding 127.0.0.1:PORT+7,
#                  PORT+19, PORT+9 to guest ports 7, 19, 9 (PORT=15000);
#                  give the guest ip=10.0.2.15/24 gw=10.0.2.2
#   WAIT_FOR=re    after READY, wait (up to TIMEOUT) for a COM1 line matching
#                  this extended regex before starting the RUN timer
#   HOOK='cmd'     run after READY/WAIT_FOR with ECHO_PORT, STREAM_PORT,
#                  DISCARD_PORT exported (e.g. net-test.py); its failure
#                  fails the script
#   KILL=1         SIGKILL QEMU after SEND instead of sending 'p'
#   MONITOR=1      HMP monitor on a unix socket, exported to HOOK as
#                  QEMU_MONITOR (e.g. for stop/cont pause tests)
#   KEEP=dir       copy COM1 output to dir/com1.txt (for scripts)
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
PORT=${PORT:-15000}
DISK=${DISK:-}
NET=${NET:-0}
MICROVM=${MICROVM:-0}
[[ -n $DISK || $NET == 1 ]] && MICROVM=1

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

machine=()
serials=(-serial stdio -serial "file:$work/hb.txt")
if [[ $MICROVM == 1 ]]; then
    machine=(-M microvm,acpi=off,x-option-roms=off,rtc=off,pit=on,pic=on,isa-serial=on
             -global virtio-mmio.force-legacy=false)
    serials=(-serial stdio)
    for i in $(seq 0 7); do
        cmdline+=" virtio_mmio.device=512@0x$(printf %x $((0xfeb00000 + i * 0x200))):$((5 + i))"
    done
    if [[ -n $DISK ]]; then
        [[ -f $DISK ]] || truncate -s "${DISK_MB:-256}M" "$DISK"
        machine+=(-drive "id=d0,file=$DISK,format=raw,if=none"
                  -device virtio-blk-device,drive=d0,serial=ferrydisk)
    fi
    if [[ $NET == 1 ]]; then
        fwd="hostfwd=tcp:127.0.0.1:$((PORT + 7))-:7,hostfwd=tcp:127.0.0.1:$((PORT + 19))-:19"
        fwd+=",hostfwd=tcp:127.0.0.1:$((PORT + 9))-:9"
        machine+=(-netdev "user,id=n0,$fwd" -device virtio-net-device,netdev=n0)
    fi
fi

monitor=(-monitor none)
[[ ${MONITOR:-0} == 1 ]] && monitor=(-monitor "unix:$work/mon.sock,server=on,wait=off")
mkfifo "$work/in"
: >"$work/hb.txt"
now_ms() { date +%s%3N; }
# COM1 without heartbeat dots (they only ever precede a line, never sit
# inside one, so dots inside lines, e.g. in IP addresses, are kept).
com1() { sed -E 's/^\.+//' "$work/com1.txt" | grep -v '^$' || true; }
t0=$(now_ms)
timeout "$TIMEOUT" qemu-system-x86_64 "${machine[@]}" -accel "$ACCEL" -cpu host,-arch-capabilities \
    -m "$MEM" -smp "$SMP" -kernel "$img" -append "$cmdline" \
    "${serials[@]}" -pidfile "$work/qemu.pid" "${monitor[@]}" \
    -display none -no-reboot -nodefaults \
    <"$work/in" >"$work/com1.txt" 2>"$work/qemu.err" &
qpid=$!
exec 3>"$work/in"
hook_rc=0

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
    if [[ -n ${WAIT_FOR:-} ]]; then
        while kill -0 "$qpid" 2>/dev/null && ! com1 | grep -qE "$WAIT_FOR"; do
            sleep 0.05
        done
    fi
    if [[ -n ${HOOK:-} ]]; then
        ECHO_PORT=$((PORT + 7)) STREAM_PORT=$((PORT + 19)) DISCARD_PORT=$((PORT + 9)) \
            QEMU_MONITOR=$work/mon.sock \
            bash -c "$HOOK" || hook_rc=$?
    fi
    sleep 0.5
    [[ -z $t_hb && -s $work/hb.txt ]] && t_hb=$(now_ms)
    hbf=$work/hb.txt
    [[ " $cmdline " == *" hb=1 "* ]] && hbf=$work/com1.txt
    dots() { tr -cd '.' <"$hbf" | wc -c; }
    h1=$(dots); s1=$(now_ms)
    sleep "$RUN"
    h2=$(dots); s2=$(now_ms)
    for c in $SEND; do
        if [[ $c == @* ]]; then
            while kill -0 "$qpid" 2>/dev/null && ! com1 | grep -qE "${c#@}"; do sleep 0.05; done
            continue
        fi
        printf '%s' "$c" >&3 2>/dev/null || true
        sleep 0.5
    done
    if [[ ${KILL:-0} == 1 && -s $work/qemu.pid ]]; then
        kill -9 "$(cat "$work/qemu.pid")" 2>/dev/null || true
        echo "(QEMU pid $(cat "$work/qemu.pid") killed with SIGKILL)" >>"$work/qemu.err"
    else
        printf 'p' >&3 2>/dev/null || true
    fi
fi
# Give QEMU a moment to power off by itself.
for _ in $(seq 100); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.05; done
t_end=$(now_ms)
still_running=0
if kill -0 "$qpid" 2>/dev/null; then still_running=1; kill "$qpid" 2>/dev/null || true; fi
wait "$qpid" 2>/dev/null && rc=0 || rc=$?
qpid=

com1
[[ -n ${KEEP:-} ]] && com1 >"$KEEP/com1.txt"
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
if [[ $hook_rc != 0 ]]; then echo "HOOK failed (rc=$hook_rc)"; exit 1; fi
