"""Two `evaluate` runs (speed.json) row by row: does each run's WS lie inside the other's
interquartile range of per-prompt ratios?

    python results/trust/compare.py IDLE/eval/speed.json HOG/eval/speed.json
"""
import json
import sys


def key(row: dict) -> tuple:
    return row["method"], row["mode"], row["batch_size"], row["k"]


def main(a_path: str, b_path: str) -> int:
    a = {key(r): r for r in json.load(open(a_path))}
    b = {key(r): r for r in json.load(open(b_path))}
    print(f"{'draft':<10} {'mode':<7} {'K':>3} {'WS A [q1-q3]':>22} {'WS B [q1-q3]':>22}  agree")
    agree = 0
    for k in sorted(a.keys() & b.keys()):
        ra, rb = a[k], b[k]
        ok = ra["ws_q1"] <= rb["ws"] <= ra["ws_q3"] and rb["ws_q1"] <= ra["ws"] <= rb["ws_q3"]
        agree += ok
        text = [f"{r['ws']:.2f}x [{r['ws_q1']:.2f}-{r['ws_q3']:.2f}]" + ("*" if r["unstable"] else "")
                for r in (ra, rb)]
        print(f"{k[0]:<10} {k[1]:<7} {k[3]:>3} {text[0]:>22} {text[1]:>22}  {'yes' if ok else 'NO'}")
    print(f"{agree} of {len(a.keys() & b.keys())} rows agree (* = flagged unstable)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
