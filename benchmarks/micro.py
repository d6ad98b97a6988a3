"""Per-layer costs of one HTCGridExecutor task, measured in isolation: ``python -m benchmarks.micro``.

The end-to-end figures (:mod:`benchmarks.run`) say how fast; the profile says where; these say
how much each piece costs on its own, so that an optimisation can be sized before it is made:

- the payload codec on both sides (signed cloudpickle, the task JSON, base64 twice);
- one Redis round trip to the grid's Redis;
- one HTTP request to the local grid through the connector's transport (urllib3) and
  through a bare ``http.client`` keep-alive connection, to the same route;
- ``concurrent.futures.Future`` and ``threading.Condition`` creation (one per task/call).

Prints a markdown table (µs per operation, median of several timed loops).
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import timeit
from concurrent.futures import Future
from urllib.parse import urlencode, urlsplit

from . import tasks

__all__ = ["measure", "main"]


def _us(fn, number: int) -> float:
    """Median over 5 loops of ``number`` calls, in µs per call."""
    runs = timeit.repeat(fn, number=number, repeat=5)
    return sorted(runs)[2] / number * 1e6


def measure(workers: int = 1) -> list[tuple[str, str, float]]:
    """(layer, operation, µs) rows."""
    from htcgrid_executor.codec import decode_output, make_task, pickle_chunk, pickle_function, seal_task
    from htcgrid_executor.grid import LocalGrid
    from htcgrid_executor.payload import dumps_signed, loads_signed, new_signing_key
    from htcgrid_executor.wire import decode_output_text, decode_task, encode_output, encode_task
    from htcgrid_executor.worker import lambda_handler

    rows: list[tuple[str, str, float]] = []
    key = new_signing_key()
    fn_blob = pickle_function(tasks.noop, key)

    def client_encode() -> bytes:
        # as a client and its connector do it: pickled, sealed for its task id, encoded
        return encode_task(seal_task(make_task(fn_blob, pickle_chunk(tasks.noop, [(1,)], key), mode="map"),
                                     "s_0", key))

    raw_input = client_encode()
    import os

    from htcgrid_executor.payload import PAYLOAD_KEY_ENV

    os.environ[PAYLOAD_KEY_ENV] = key
    event = decode_task(raw_input)
    result = lambda_handler(event)
    output = encode_output(json.dumps(result))

    rows.append(("client codec", "pickle_chunk + make_task + seal_task + encode_task (one 1-item chunk)", _us(client_encode, 5000)))
    rows.append(("client codec", "dumps_signed(1) alone (cloudpickle + HMAC + base64)",
                 _us(lambda: dumps_signed(1, key), 5000)))
    rows.append(("runner codec", "decode_task (base64 + JSON)", _us(lambda: decode_task(raw_input), 5000)))
    rows.append(("runner codec", "lambda_handler(noop) (loads_signed args, call, dumps_signed result)",
                 _us(lambda: lambda_handler(event), 5000)))
    rows.append(("runner codec", "json.dumps(envelope) + encode_output",
                 _us(lambda: encode_output(json.dumps(result)), 5000)))
    rows.append(("client codec", "decode output (base64, JSON, loads_signed)",
                 _us(lambda: decode_output(decode_output_text(output), key), 5000)))
    rows.append(("payload", "loads_signed of a small blob (HMAC check + unpickle)",
                 _us(lambda: loads_signed(fn_blob, key), 5000)))
    rows.append(("futures", "concurrent.futures.Future()", _us(Future, 20000)))
    rows.append(("futures", "threading.Condition(threading.Lock())",
                 _us(lambda: threading.Condition(threading.Lock()), 20000)))

    grid = LocalGrid(workers).start()
    try:
        import redis

        config = grid.client_config
        r = redis.Redis.from_url(config["redis_url"], password=config["redis_password"] or None)
        r.ping()
        rows.append(("Redis", "PING round trip (redis-py, hiredis if installed)", _us(r.ping, 2000)))
        pipe_payload = [(f"bench-micro-{i}-input", b"x" * 100) for i in range(100)]  # a data-plane key

        def pipeline_100() -> None:
            p = r.pipeline(transaction=False)
            for k, v in pipe_payload:
                p.set(k, v, ex=60)
            p.execute()

        rows.append(("Redis", "pipeline of 100 SETs (one round trip), per SET", _us(pipeline_100, 200) / 100))

        from htcgrid_executor.connector import AWSConnector
        from htcgrid_executor.wire import encode_query

        connector = AWSConnector()
        connector.init(config)
        transport = connector.transport
        sid = connector.send([make_task(fn_blob, pickle_chunk(tasks.noop, [(1,)], key), mode="map")])["session_id"]
        # a poll of a real one-task session, as the connector sends it (see AWSConnector._result)
        params = {"submission_content": encode_query({"session_id": sid}), "after": "0"}

        def via_requests() -> None:
            transport.request("GET", "/result", params, retry=False)

        url = urlsplit(grid.url)
        conn = http.client.HTTPConnection(url.hostname, url.port)
        headers = transport.auth.headers()
        path = "/result?" + urlencode(params)

        def via_http_client() -> None:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"GET /result answered {response.status}")

        via_requests()
        via_http_client()
        rows.append(("HTTP", "GET /result via the connector's transport (urllib3)", _us(via_requests, 300)))
        rows.append(("HTTP", "GET /result via http.client keep-alive, same route and server", _us(via_http_client, 300)))
        conn.close()
        connector.close()
    finally:
        grid.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    rows = measure()
    print("| layer | operation | µs |\n|---|---|---|")
    for layer, op, us in rows:
        print(f"| {layer} | {op} | {us:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
