#!/usr/bin/env bash
# End-to-end test of the guest's virtio drivers under QEMU microvm (via
# run-qemu.sh):
#   1. disk=write + net: TCP echo / stream / discard from the host through
#      slirp port forwards, STATUS, then SIGKILL QEMU mid-write;
#      (1b: echo + stream connections survive a 3 s stop/cont);
#   2. disk=verify on the same image: DISK found >= the last durable count,
#      `d` verifies OK;
#   3. disk=write again: continues after the prefix, `d` verifies OK;
#   4. corrupted copies of the image: a zeroed and a misplaced record are
#      detected by the start-up scan;
#   5. the old non-virtio modes (pc machine) still work.
#
#   crates/testguest/virtio-test.sh        (ELF=..., PORT=15000 as run-qemu.sh)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d /tmp/ferry-virtio-test.XXXXXX)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
field() { grep -o "$1=[0-9]*" | tail -1 | cut -d= -f2; }

if [[ -z ${ELF:-} ]]; then
    (cd "$here" && cargo build -q -p ferry-testguest --message-format=json) >"$work/build.json"
    outdir=$(grep -o '"out_dir":"[^"]*ferry-testguest[^"]*"' "$work/build.json" | tail -1 | cut -d'"' -f4)
    export ELF=$outdir/ferry-testguest.elf
fi
img=$work/disk.img
net="ip=10.0.2.15/24 gw=10.0.2.2"

echo "== 1. write + net, then SIGKILL"
DISK=$img DISK_MB=1024 NET=1 SMP=2 WAIT_FOR='^DISK found=' \
    HOOK="python3 '$here/net-test.py' all 16" RUN=2 SEND='v @^VERIFY s' KILL=1 KEEP=$work \
    "$here/run-qemu.sh" "hb=1 $net disk=write qd=8 flush=4 dirty=8" | tee "$work/1.txt"
grep -q '^HOOK failed' "$work/1.txt" && fail "network test"
grep -q '^NET up mac=52:54:00:12:34:56 ip=10.0.2.15/24$' "$work/com1.txt" || fail "NET up line"
grep -q '^VERIFY OK pages=2048 ' "$work/com1.txt" || fail "dirtier (placed after the virtio arena)"
grep -q '^DISK found=0 capacity=262144 serial="ferrydisk"$' "$work/com1.txt" || fail "DISK found line"
st=$(grep '^STATUS' "$work/com1.txt" | tail -1)
[[ $st == *" tcp_conns=0"* && $st == *" disk_errors=0 "* ]] || fail "STATUS: $st"
durable=$(field disk_durable <<<"$st")
acked=$(field disk_acked <<<"$st")
[[ $durable -gt 0 && $acked -ge $durable ]] || fail "nothing durable: $st"
echo "-> acked=$acked durable=$durable at the last STATUS"
cp --sparse=always "$img" "$work/saved.img"

echo "== 1b. TCP connections survive a 3 s vCPU pause (HMP stop/cont)"
NET=1 MONITOR=1 SMP=1 RUN=0 HOOK="python3 '$here/net-test.py' pause" SEND='s' \
    "$here/run-qemu.sh" "hb=0 $net" >"$work/1b.txt"
grep -q '^HOOK failed' "$work/1b.txt" && fail "pause test"
grep '^NETTEST' "$work/1b.txt"

echo "== 2. verify after SIGKILL"
DISK=$img RUN=0 WAIT_FOR='^DISK found=' SEND='d @^DISK.VERIFY s' KEEP=$work TIMEOUT=120 \
    "$here/run-qemu.sh" "hb=0 disk=verify" | tee "$work/2.txt"
found=$(grep '^DISK found=' "$work/com1.txt" | field found)
[[ $found -ge $durable ]] || fail "found=$found < durable=$durable"
grep -q '^DISK VERIFY FAIL' "$work/com1.txt" && fail "verify"
grep -q "^DISK VERIFY OK records=$found\$" "$work/com1.txt" || fail "no VERIFY OK"
grep -q "^STATUS .* disk_acked=$found disk_durable=$found disk_errors=0\$" "$work/com1.txt" ||
    fail "STATUS after verify"

echo "== 3. write again"
DISK=$img RUN=1 WAIT_FOR='^DISK found=' SEND='d @^DISK.VERIFY s' KEEP=$work TIMEOUT=120 \
    "$here/run-qemu.sh" "hb=0 disk=write qd=16 flush=1" | tee "$work/3.txt"
grep -q "^DISK found=$found " "$work/com1.txt" || fail "rescan found a different prefix"
grep -q '^DISK VERIFY OK records=' "$work/com1.txt" || fail "no VERIFY OK"
n=$(grep '^STATUS' "$work/com1.txt" | tail -1 | field disk_acked)
[[ $n -gt $found ]] || fail "no progress: $n"

echo "== 4. corruption is detected"
cp --sparse=always "$work/saved.img" "$img"
dd if=/dev/zero of="$img" bs=4096 seek=3 count=1 conv=notrunc status=none
DISK=$img RUN=0 WAIT_FOR='^DISK found=' SEND='s' KEEP=$work \
    "$here/run-qemu.sh" "hb=0 disk=verify" >"$work/4a.txt"
grep -q '^DISK found=3 ' "$work/com1.txt" || fail "zeroed record 3 not detected"
cp --sparse=always "$work/saved.img" "$img"
dd if="$work/saved.img" of="$img" bs=4096 skip=5 seek=7 count=1 conv=notrunc status=none
DISK=$img RUN=0 WAIT_FOR='^DISK.VERIFY' SEND='s' KEEP=$work \
    "$here/run-qemu.sh" "hb=0 disk=verify" >"$work/4b.txt"
grep -q '^DISK found=7 ' "$work/com1.txt" || fail "misplaced record 7: wrong prefix"
grep -q '^DISK VERIFY FAIL record=7 reason=seq:5$' "$work/com1.txt" || fail "misplaced record 7"
echo "-> zeroed and misplaced records detected"

echo "== 5. legacy modes"
"$here/run-qemu.sh" "mode=run dirty=16" >"$work/5a.txt"
grep -q '^VERIFY OK pages=4096' "$work/5a.txt" || fail "dirty verify (pc)"
grep -qE '^STATUS uptime_ms=[0-9]+ writes=[0-9]+ hb=[0-9]+ cpus=2 ap_counters=[0-9]+$' "$work/5a.txt" ||
    fail "STATUS format (pc)"
PVH=1 SMP=1 "$here/run-qemu.sh" "mode=exit code=7" >"$work/5b.txt"
grep -q '^EXIT code=7$' "$work/5b.txt" || fail "PVH exit"
# virtio tokens, but nothing enabled: no device is touched.
MICROVM=1 SEND=s "$here/run-qemu.sh" "hb=1" >"$work/5c.txt"
grep -q 'unknown=' "$work/5c.txt" && fail "virtio_mmio tokens reported unknown"
grep -q '^READY$' "$work/5c.txt" || fail "microvm without devices"
echo "PASS"
