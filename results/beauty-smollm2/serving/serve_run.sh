#!/bin/bash
# issue #32: the endpoint on the shared Beauty target, calibrated-start router, strict k=10
# SERVE_FLAGS: more serve flags (e.g. '--set dtype=bfloat16'); C16=0 leaves concurrency 16 out
cd /work/main
A=/work/main/.venv/bin/atspeed-ray
R=/work/runs
DRAFT=${DRAFT:-$R/feat4b/draft}
OUT=${OUT:-$R/serve10}
PORT=8123
date +"start %T"
$A serve --target $R/target --draft $DRAFT --data $R/data --with-baseline --port $PORT ${SERVE_FLAGS:-} > $OUT/serve.log 2>&1 &
SP=$!
for i in $(seq 1 900); do curl -sf http://127.0.0.1:$PORT/readyz >/dev/null 2>&1 && curl -sf http://127.0.0.1:$PORT/baseline/readyz >/dev/null 2>&1 && break; sleep 2; done
date +"up %T"
$A loadtest --url http://127.0.0.1:$PORT --baseline-url http://127.0.0.1:$PORT/baseline --requests 64 --concurrency 1 --k 10 --data $R/data --warmup 4 --timeout 120 --rounds 4 --json $OUT/c1.json > $OUT/c1.log 2>&1
date +"c1 %T"
$A loadtest --url http://127.0.0.1:$PORT --baseline-url http://127.0.0.1:$PORT/baseline --requests 192 --concurrency 8 --k 10 --data $R/data --warmup 8 --timeout 300 --rounds 4 --json $OUT/c8.json > $OUT/c8.log 2>&1
date +"c8 %T"
[ "${C16:-1}" = 0 ] || $A loadtest --url http://127.0.0.1:$PORT --baseline-url http://127.0.0.1:$PORT/baseline --requests 192 --concurrency 16 --k 10 --data $R/data --warmup 16 --timeout 300 --rounds 4 --json $OUT/c16.json > $OUT/c16.log 2>&1
[ "${C16:-1}" = 0 ] || date +"c16 %T"
curl -s http://127.0.0.1:$PORT/stats > $OUT/stats.json
kill -TERM $SP; wait $SP; echo "serve rc $?"
