"""The Python side of bench/compare: multiprocessing.Pool on no-op tasks.

    python3 pool.py TASKS CHUNKSIZE WORKERS      # CHUNKSIZE: a number, or auto
    python3 pool.py --memory WORKERS             # print worker pids, then idle

`auto` is the rule Pool.map uses: tasks / (4 * workers).
"""

import multiprocessing as mp
import sys
import time


def noop(x):
    return x


def nap(_):
    time.sleep(2)
    return None


def main():
    if sys.argv[1] == "--memory":
        workers = int(sys.argv[2])
        with mp.Pool(workers) as pool:
            result = pool.map_async(nap, range(workers), chunksize=1)
            time.sleep(0.5)
            print(" ".join(str(p.pid) for p in pool._pool), flush=True)
            result.get()
        return
    tasks, chunksize, workers = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if chunksize == "auto":
        chunksize = max(1, tasks // (4 * workers))
    with mp.Pool(workers) as pool:
        for _ in pool.imap_unordered(noop, range(tasks), chunksize=int(chunksize)):
            pass


if __name__ == "__main__":
    main()
