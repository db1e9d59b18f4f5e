#!/bin/bash
# make demo on a fresh clone of main; $1 = idle|hog (hog: a busy loop pinned to core 1 throughout)
NAME=$1; R=${R:-/work/runs/trust2}  # R: where the clone and the outputs go
rm -rf $R/clone-$NAME $R/$NAME; git clone -q /work/main $R/clone-$NAME
cd $R/clone-$NAME; git log --oneline | head -1 > $R/$NAME.commit
if [ "$NAME" = hog ]; then taskset -c 1 python3 -c 'while 1: pass' & HOG=$!; fi
( uptime; date +"start %T"; time make demo OUT=$R/$NAME; echo "rc=$?"; date +"end %T"; uptime ) > $R/$NAME.log 2>&1
[ -n "$HOG" ] && kill $HOG
echo "$NAME done" >> $R/status
