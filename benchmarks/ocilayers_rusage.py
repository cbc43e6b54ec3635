"""Run the ocilayers CLI in this process, then write this process's peak RSS and the largest
peak RSS of its reaped children (the unpack worker processes) as JSON:
    python benchmarks/ocilayers_rusage.py OUT.json -- [ocilayers arguments...]
The timed runs use the `ocilayers` command itself; this wrapper only splits the memory figure
between the parent and the workers (wait4 from outside reports the maximum of the two)."""

import json
import resource
import sys

from ocilayers.cli import main

out, sep, *args = sys.argv[1:]
assert sep == "--", __doc__
rc = main(args)
parent = resource.getrusage(resource.RUSAGE_SELF)
children = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as f:
    json.dump({"exit": rc, "parent_maxrss_kib": parent.ru_maxrss,
               "workers_maxrss_kib": children.ru_maxrss,
               "parent_cpu_s": parent.ru_utime + parent.ru_stime,
               "workers_cpu_s": children.ru_utime + children.ru_stime}, f)
sys.exit(rc)
