"""DirectRedis: the redis-py client of the grid's own processes (agents, control plane).

redis-py 6 and later wraps every command in a retry loop, an observability record and closures
made per call: py-spy put a fifth of the control plane's samples per single task there, outside
the send and the reply's parse. The grid's processes do not want that retry either: a command
that failed on its connection may have run (a claim, a completion), and the agent's main loop
and the clients of the control plane's routes retry with their own backoff, knowing what is
safe to repeat.

So :class:`DirectRedis` takes a pooled connection, sends the command, parses its reply with
redis-py's own callbacks and gives the connection back, using only redis-py's public
connection API. A connection that failed is closed (the next command gets a fresh one) and the
error is raised as it is; so is an interrupt (the agent's SIGTERM handler raises in its blocking
wait on the doorbell), whose connection is closed too, since its reply is still due. Pipelines,
scripts and every command method work as they do on ``redis.Redis``. The executor's connector
keeps redis-py's own client: its data-plane retries run within the outage budget
(:mod:`htcgrid_executor.connector.redis_budget`).
"""

from __future__ import annotations

from typing import Any

import redis

__all__ = ["DirectRedis"]


class DirectRedis(redis.Redis):
    """``redis.Redis`` whose commands are sent once: no retry after a connection or time-out
    error (raised as redis-py raises them, the connection closed; closed too after an interrupt),
    no per-command observability. Thread-safe as ``redis.Redis`` is (one pooled connection per command)."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        pool = self.connection_pool
        conn = self.connection or pool.get_connection()
        try:
            conn.send_command(*args, **options)
            return self.parse_response(conn, args[0], **options)
        except redis.exceptions.ResponseError:
            raise  # Redis answered with an error: the connection is in step
        except BaseException:
            # a connection or time-out error, or an interrupt (the agent's SIGTERM ends a
            # blocking wait): a reply may be due or half read, so the connection goes (redis-py's
            # connection closes itself on most of these; this covers the rest, at no cost)
            conn.disconnect()
            raise
        finally:
            if not self.connection:
                pool.release(conn)
