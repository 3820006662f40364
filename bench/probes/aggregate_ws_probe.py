"""Merge ws_probe_results_run*.json: mean (and min-max) server us/echo, p50/p99 per stack x rate."""
import glob, json, os, statistics as st
HERE = os.path.dirname(os.path.abspath(__file__))
cells = {}
order = []
for path in sorted(glob.glob(os.path.join(HERE, "ws_probe_results_run*.json"))):
    for r in json.load(open(path))["results"]:
        if r["stack"] not in order:
            order.append(r["stack"])
        for ph in r["phases"]:
            cells.setdefault((r["stack"], ph["rate"]), []).append(ph)
out = []
for stack in order:
    for rate in sorted({k[1] for k in cells if k[0] == stack}):
        phs = cells[(stack, rate)]
        us = [p["server_us_per_echo"] for p in phs]
        out.append({"stack": stack, "rate": rate, "runs": len(phs),
                    "server_us_per_echo_mean": round(st.mean(us), 1), "min": min(us), "max": max(us),
                    "user_us": round(st.mean(p["server_user_us_per_echo"] for p in phs), 1),
                    "sys_us": round(st.mean(p["server_sys_us_per_echo"] for p in phs), 1),
                    "server_cpu_pct": round(st.mean(p["server_cpu_pct"] for p in phs), 1),
                    "p50_ms": round(st.median(p["rtt_p50_ms"] for p in phs), 2),
                    "p99_ms": round(max(p["rtt_p99_ms"] for p in phs), 2)})
for o in out:
    print(f"{o['stack'][:58]:58} R={o['rate']:>5.0f} {o['server_us_per_echo_mean']:>6.1f} us ({o['min']}-{o['max']}) "
          f"usr {o['user_us']} sys {o['sys_us']} cpu {o['server_cpu_pct']}% p50 {o['p50_ms']} p99 {o['p99_ms']}")
json.dump(out, open(os.path.join(HERE, "ws_probe_summary.json"), "w"), indent=1)
