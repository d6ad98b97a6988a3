"""An agent of the stand-in deployment (see deployment_standin.py): as upstream's ``agent.py`` does, take one
task from the queue, claim it if it is pending, run the worker function on the decoded task dict
(nothing else: no task id, no time limit), store its JSON answer and mark the task finished if
it still owns it; heartbeat meanwhile. The worker runs in this process, in its main thread, as
a Lambda runtime runs a handler."""

from __future__ import annotations

import json
import os
import threading
import time

import redis

from htcgrid_executor import wire
from htcgrid_executor.worker import lambda_handler

CLAIM = """
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'processing', 'owner', ARGV[1], 'hb', ARGV[2])
return 1
"""
FINISH = """
if redis.call('HGET', KEYS[1], 'state') ~= 'processing' or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1]
then return 0 end
redis.call('HSET', KEYS[1], 'state', 'finished')
return 1
"""
BEAT = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then redis.call('HSET', KEYS[1], 'hb', ARGV[2]) end
return 0
"""


def main() -> None:
    db = redis.Redis.from_url(os.environ["STANDIN_REDIS"])
    me = str(os.getpid())
    claim, finish, beat = db.register_script(CLAIM), db.register_script(FINISH), db.register_script(BEAT)
    while True:
        item = db.brpop(["standin:queue"], timeout=1)
        if not item:
            continue
        tid = item[1].decode()
        row = f"standin:task:{tid}"
        if not claim(keys=[row], args=[me, time.time()]):
            continue  # not pending (finished, cancelled, or claimed by another agent)
        stop = threading.Event()

        def heartbeat(row: str = row, stop: threading.Event = stop) -> None:
            while not stop.wait(0.2):
                beat(keys=[row], args=[me, time.time()])

        thread = threading.Thread(target=heartbeat, daemon=True)
        thread.start()
        task = wire.decode_task(db.get(wire.input_key(tid)))
        answer = lambda_handler(task, None)
        db.set(wire.output_key(tid), wire.encode_output(json.dumps(answer)))
        stop.set()
        thread.join()
        finish(keys=[row], args=[me])


if __name__ == "__main__":
    main()
