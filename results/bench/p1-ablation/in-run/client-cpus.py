# Samples, every 0.5 s, the CPU each netboot-bench latency client last ran on
# (/proc/PID/stat field 39), with its cgroup, until the run log says rc=.
# python3 client-cpus.py OUT.txt RUN.log   (started beside the run)
import os, sys, time
out = open(sys.argv[1], 'a')
log = sys.argv[2]
pids = {}
last_scan = 0
while True:
    now = time.time()
    if now - last_scan > 5:
        last_scan = now
        for p in os.listdir('/proc'):
            if not p.isdigit() or p in pids: continue
            try:
                c = open(f'/proc/{p}/cmdline','rb').read()
                if b'__client' in c:
                    cg = [l for l in open(f'/proc/{p}/cgroup').read().splitlines() if l.startswith('0::')]
                    pids[p] = cg[0][3:] if cg else '?'
            except OSError: pass
    for p, cg in list(pids.items()):
        try:
            st = open(f'/proc/{p}/stat').read()
            f = st.rsplit(')',1)[1].split()
            out.write(f'{now:.1f} {p} {f[36]} {f[11]} {f[12]} {cg}\n')
        except OSError:
            del pids[p]
    out.flush()
    if 'rc=' in open(log).read(): break
    time.sleep(0.5)
