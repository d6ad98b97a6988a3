"""Who can get in, and what a forged payload can do: nothing.

- The HTTP API and Redis refuse anyone without the grid's credentials.
- Both listen on loopback only, unless told otherwise; secrets are on no command line.
- Redis has a user per role (agents, the grid's process, clients' data plane), none of which may
  configure it, load a module or save files; clients reach data-plane keys only, and no script;
  the admin password stays in the grid's process.
- Credential and config files are readable by their owner only.
- A pickle is loaded only when its HMAC matches the grid secret: a tampered ``<task_id>-input``
  is refused by the agent, a tampered ``<task_id>-output`` by the client, and neither is ever
  unpickled (a ``Trap`` in the forged pickle would create a file when loaded).
- Signed parts of different calls recombined, an input replayed under another task, outputs
  swapped together with their inputs: refused (a task's parts are sealed with its task id).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import stat
from pathlib import Path

import fault_tasks
import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from support import wait_for

from htcgrid_executor import (
    AuthenticationError,
    HTCGridExecutor,
    PayloadError,
    SignatureError,
    StorageError,
    wire,
)
from htcgrid_executor.codec import decode_output, make_task, pickle_args, pickle_function, task_binding
from htcgrid_executor.grid.agent import AGENT_CONFIG_ENV
from htcgrid_executor.grid.state_table import _key_for as key_for
from htcgrid_executor.payload import SignedPickle, sign_bytes
from htcgrid_executor.states import TaskState
from htcgrid_executor.wire import decode_task, encode_raw, input_key, is_raw, output_key


def _executor_task(grid, fn, *args):
    key = grid.payload_signing_key
    return make_task(pickle_function(fn, key), pickle_args(fn, args, {}, key))


# ------------------------------------------------------------------------------- credentials


def test_redis_refuses_clients_without_the_password(make_grid, figures):
    grid = make_grid(workers=1)
    server = grid.redis_server
    grid.redis.set("canary", b"grid data")
    once = dict(socket_timeout=5, retry=Retry(NoBackoff(), 0))  # redis-py retries refusals by default
    attempts = [
        redis.Redis(host="127.0.0.1", port=server.port, **once),
        redis.Redis(host="127.0.0.1", port=server.port, password="wrong", **once),
        redis.Redis(unix_socket_path=server.unix_socket, **once),
        redis.Redis(unix_socket_path=server.unix_socket, password="wrong", **once),
    ]
    for client in attempts:
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.get("canary")
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.set("canary", b"overwritten")
        client.close()
    assert grid.redis.get("canary") == b"grid data"
    figures["unauthorised_requests_refused"] += 2 * len(attempts)


def test_a_client_with_a_wrong_data_plane_password_gets_a_storage_error(make_grid, make_connector, figures):
    grid = make_grid(workers=1)
    url = f"redis://127.0.0.1:{grid.redis_server.port}/0"  # the config's URL carries the password
    big = b"x" * (wire.INLINE_SUBMIT_BYTES + 1000)  # written to the data plane before /submit
    for password in ("wrong", ""):
        connector = make_connector(grid, redis_url=url, redis_password=password)
        with pytest.raises(StorageError, match="refused the credentials"):
            connector.send([_executor_task(grid, fault_tasks.identity, big)])
        # a small session goes in the body of /submit; its outputs' read is refused
        small = connector.send([_executor_task(grid, fault_tasks.square, 2)])
        with pytest.raises(StorageError, match="refused the credentials"):
            connector.get_results(small, timeout_sec=30)
    figures["unauthorised_requests_refused"] += 4


def test_the_http_api_refuses_a_client_with_a_wrong_key(make_grid, make_connector, figures):
    grid = make_grid(workers=1)
    good = make_connector(grid)
    response = good.send([_executor_task(grid, fault_tasks.square, 2)])
    intruder = make_connector(grid, api_gateway_key="not-the-key")
    sessions = lambda: set(grid.redis.scan_iter(match="htcgrid:session:*", count=1000))  # noqa: E731
    before = sessions()
    with pytest.raises(AuthenticationError):
        intruder.send([_executor_task(grid, fault_tasks.square, 3)])
    assert sessions() == before  # nothing was queued
    with pytest.raises(AuthenticationError):
        intruder.get_results(response, timeout_sec=5)
    with pytest.raises(AuthenticationError):
        intruder.cancel_sessions([response["session_id"]])
    answer = good.get_results(response, timeout_sec=30)  # untouched by the intruder's cancel
    assert [decode_output(t, grid.payload_signing_key) for t in answer["finished_OUTPUT"]] == [(True, 4)]
    figures["unauthorised_requests_refused"] += 3


# ------------------------------------------------------------------------------- the network


def test_the_http_api_and_redis_listen_on_loopback_only(make_grid):
    grid = make_grid(workers=2)
    http_port = int(grid.url.rsplit(":", 1)[1])
    control_plane = psutil.Process(grid.control_plane_stats()["pid"])  # the HTTP API's process
    listening = [c for c in control_plane.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    http = [c for c in listening if c.laddr.port == http_port]
    assert http and all(c.laddr.ip == "127.0.0.1" for c in listening)
    # the user's process listens on nothing: the routes are not among its threads
    assert not [c for c in psutil.Process().net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == http_port]
    redis_listening = [c for c in psutil.Process(grid.redis_server.pid).net_connections(kind="inet")
                       if c.status == psutil.CONN_LISTEN]
    assert redis_listening and {c.laddr.ip for c in redis_listening} == {"127.0.0.1"}
    # agents and runners listen on nothing at all
    for pid in grid.agent_pids() + grid.runner_pids():
        assert not [c for c in psutil.Process(pid).net_connections(kind="all") if c.status == psutil.CONN_LISTEN]
    config = grid.client_config
    for name in ("public_api_gateway_url", "private_api_gateway_url"):
        assert config[name].startswith("http://127.0.0.1:")
    assert "@127.0.0.1:" in config["redis_url"]


def test_no_secret_appears_on_a_command_line(make_grid, make_executor):
    grid = make_grid(workers=2)
    make_executor(grid).submit(fault_tasks.square, 2).result(timeout=30)  # runners up and used
    secrets = [grid.api_key, grid.payload_signing_key, grid.redis_server.password]
    pids = [grid.redis_server.pid, grid.control_plane_stats()["pid"], *grid.agent_pids(), *grid.runner_pids()]
    assert len(pids) >= 6
    for pid in pids:
        cmdline = " ".join(psutil.Process(pid).cmdline())
        assert not [s for s in secrets if s in cmdline], f"a secret is on the command line of pid {pid}"


# ------------------------------------------------------------------------------- files


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def usual_umask():
    """A usual umask (022): files come out world-readable unless the code makes them otherwise."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_credentials_config_and_redis_files_are_owner_only(make_grid, tmp_path, usual_umask):
    folder = tmp_path / "grid"
    grid = make_grid(workers=1, folder=folder)
    assert _mode(folder / "credentials.json") == 0o600
    stored = json.loads((folder / "credentials.json").read_text())
    assert stored["api_key"] == grid.api_key and stored["payload_signing_key"] == grid.payload_signing_key
    assert _mode(folder / "redis") == 0o700
    assert _mode(folder / "redis" / "redis.conf") == 0o600
    assert _mode(os.path.dirname(grid.redis_server.unix_socket)) == 0o700
    # a client config written over an existing world-readable file ends up owner-only too
    target = tmp_path / "client.json"
    target.write_text("{}")
    os.chmod(target, 0o644)
    grid.write_client_config(target)
    assert _mode(target) == 0o600
    assert json.loads(target.read_text())["payload_signing_key"] == grid.payload_signing_key


# ------------------------------------------------------------------------------- signed payloads


def _read_task(grid, task_id):
    """An executor task's input as the local grid holds it (raw: its pickles as bytes), with its
    signed pickles as text for the forgeries below."""
    value = grid.redis.get(input_key(task_id))
    assert is_raw(value), "the executor's tasks go raw to the local grid"
    return {k: v.text() if isinstance(v, SignedPickle) else v for k, v in decode_task(value).items()}


def _write_task(grid, task_id, task):
    """Write a (forged) task back raw, each text that is a signed blob as bytes again."""
    def raw_form(value):
        try:
            return SignedPickle.from_text(value) if isinstance(value, str) else value
        except PayloadError:
            return value  # not a signed blob: stays text, which the worker refuses
    grid.redis.set(input_key(task_id), encode_raw({k: raw_form(v) for k, v in task.items()}))


def _forged_pickle(blob: str, trap_path) -> str:
    """The same signed blob with its pickle swapped for a Trap, the MAC left as it was."""
    prefix, mac, _ = blob.split(".", 2)
    data = base64.b64encode(pickle.dumps(fault_tasks.Trap(str(trap_path)))).decode()
    return f"{prefix}.{mac}.{data}"


def _resigned(trap_path, key="an-attackers-guess") -> str:
    return sign_bytes(pickle.dumps(fault_tasks.Trap(str(trap_path))), key)


@pytest.mark.timeout(60)
def test_tampered_inputs_are_refused_by_the_agent_and_never_unpickled(make_grid, make_executor, tmp_path,
                                                                      figures):
    grid = make_grid(workers=0)  # nothing runs until the inputs have been tampered with
    executor = make_executor(grid)
    cases = {
        "args, pickle changed, MAC kept": ("args", lambda blob, trap: _forged_pickle(blob, trap), SignatureError),
        "args, re-signed with a wrong key": ("args", lambda blob, trap: _resigned(trap), SignatureError),
        "fn, re-signed with a wrong key": ("fn", lambda blob, trap: _resigned(trap), SignatureError),
        "fn, a bare pickle": ("fn", lambda blob, trap: base64.b64encode(
            pickle.dumps(fault_tasks.Trap(str(trap)))).decode(), PayloadError),
    }
    futures = {name: executor.submit(fault_tasks.square, 3) for name in cases}
    untouched = executor.submit(fault_tasks.square, 4)
    records = executor.sessions(timeout=30)
    task_ids = [tid for record in records for tid in record["task_ids"]]
    assert len(task_ids) == len(cases) + 1
    traps = {}
    for (name, (field, forge, _)), task_id in zip(cases.items(), task_ids, strict=False):
        traps[name] = tmp_path / f"trap-{len(traps)}"
        task = _read_task(grid, task_id)
        task[field] = forge(task[field], traps[name])
        _write_task(grid, task_id, task)
    grid.add_agents(1)
    for name, (_, _, error) in cases.items():
        with pytest.raises(error) as refused:
            futures[name].result(timeout=30)
        assert "refus" in str(refused.value) or "not a signed" in str(refused.value), name
        assert not traps[name].exists(), f"{name}: the forged pickle was loaded"
    assert untouched.result(timeout=30) == 16  # a batch-mate of the forgeries runs as usual
    figures["tampered_payloads_refused"] += len(cases)
    figures["tasks_run"] += 1


def _tamper_output(grid, task_id, change):
    envelope = json.loads(base64.b64decode(grid.redis.get(output_key(task_id))))
    change(envelope)
    grid.redis.set(output_key(task_id), base64.b64encode(json.dumps(envelope).encode()))


@pytest.mark.timeout(60)
def test_tampered_outputs_are_refused_by_the_client_and_never_unpickled(make_grid, make_connector, tmp_path,
                                                                        figures):
    grid = make_grid(workers=1)
    key = grid.payload_signing_key
    connector = make_connector(grid)
    response = connector.send([_executor_task(grid, fault_tasks.square, 2),
                               _executor_task(grid, fault_tasks.square, 3),
                               _executor_task(grid, fault_tasks.raise_stubborn_error),
                               _executor_task(grid, fault_tasks.square, 5)])
    wait_for(lambda: grid.table.session_info(response["session_id"])["finished"] == 4, timeout=30)
    first, second, third, fourth = response["task_ids"]
    traps = [tmp_path / f"trap-{i}" for i in range(3)]
    _tamper_output(grid, first, lambda env: env.update(result=_forged_pickle(env["result"], traps[0])))
    _tamper_output(grid, second, lambda env: env.update(result=_resigned(traps[1])))
    _tamper_output(grid, third, lambda env: env.update(exception=_resigned(traps[2])))

    # the connector hands back the text; the executor's codec refuses it
    answer = connector.get_results(response, timeout_sec=30)
    decoded = [decode_output(text, key) for text in answer["finished_OUTPUT"]]
    for ok, value in decoded[:3]:
        assert not ok and isinstance(value, SignatureError)
    assert decoded[3] == (True, 25)
    # and so does an executor that attaches to the session
    futures = HTCGridExecutor.attach([response], config=grid.client_config, broken_after_sec=10)
    for future in futures[:3]:
        with pytest.raises(SignatureError, match="refusing to unpickle"):
            future.result(timeout=30)
    assert futures[3].result(timeout=30) == 25
    assert not [trap for trap in traps if trap.exists()], "a forged pickle was loaded"
    figures["tampered_payloads_refused"] += 6


@pytest.mark.timeout(60)
def test_a_client_holding_another_key_is_refused_by_the_agents(make_grid, figures):
    grid = make_grid(workers=1)
    config = {**grid.client_config, "payload_signing_key": "not-the-grid-secret"}
    with HTCGridExecutor(config=config, broken_after_sec=10) as executor:
        with pytest.raises(SignatureError, match="the worker refused the task"):
            executor.submit(fault_tasks.square, 2).result(timeout=30)
    figures["tampered_payloads_refused"] += 1


@pytest.mark.timeout(60)
def test_an_output_moved_to_another_task_is_refused(make_grid, make_connector, figures):
    grid = make_grid(workers=1)
    connector = make_connector(grid)
    response = connector.send([_executor_task(grid, fault_tasks.square, 2),
                               _executor_task(grid, fault_tasks.square, 3)])
    wait_for(lambda: grid.table.session_info(response["session_id"])["finished"] == 2, timeout=30)
    first, second = response["task_ids"]
    grid.redis.set(output_key(second), grid.redis.get(output_key(first)))
    futures = HTCGridExecutor.attach([response], config=grid.client_config, broken_after_sec=10)
    assert futures[0].result(timeout=30) == 4
    with pytest.raises(SignatureError):
        futures[1].result(timeout=30)  # made for the first task: refused
    figures["tampered_payloads_refused"] += 1


def _data_plane_writer(grid):
    """An attacker holding the data-plane password alone (the client config's ``redis_url``)."""
    return redis.Redis.from_url(grid.client_config["redis_url"], socket_timeout=5)


def _new_task_ids(executor, known):
    ids = [tid for record in executor.sessions(timeout=30) for tid in record["task_ids"] if tid not in known]
    known.update(ids)
    return ids


@pytest.mark.timeout(90)
def test_signed_parts_of_other_calls_recombined_or_replayed_are_refused_before_unpickling(
        make_grid, make_executor, tmp_path, figures):
    """The issue's attack: through the data plane, one call's signed function paired with another
    call's signed arguments, and a finished call's input replayed under a new task, ran. Each
    task's parts are now sealed together with its task id: the agent refuses them unrun."""
    grid = make_grid(workers=0)
    executor = make_executor(grid)
    writer = _data_plane_writer(grid)
    log, trap, gate = tmp_path / "ran.log", tmp_path / "trap", tmp_path / "gate"
    known: set[str] = set()
    finished = executor.submit(fault_tasks.logged_square, str(log), 2)
    (finished_id,) = _new_task_ids(executor, known)
    finished_input = writer.get(input_key(finished_id))  # the attacker keeps a copy
    grid.add_agents(1)
    assert finished.result(timeout=30) == 4
    # the only agent kept busy, so that the next calls wait in the queue to be tampered with
    holder = executor.submit(fault_tasks.wait_for_file, str(gate), "held")
    (holder_id,) = _new_task_ids(executor, known)
    wait_for(lambda: grid.table.task_state(holder_id) == TaskState.PROCESSING, timeout=30)
    calls = [executor.submit(fault_tasks.square, 3),
             # genuine, signed arguments that spring the trap when unpickled
             executor.submit(fault_tasks.identity, fault_tasks.Trap(str(trap))),
             executor.submit(fault_tasks.square, 5)]
    square_id, trap_id, replay_id = _new_task_ids(executor, known)
    square_task = decode_task(writer.get(input_key(square_id)))  # raw inputs: pickles as bytes
    trap_task = decode_task(writer.get(input_key(trap_id)))
    forged = {square_id: {**square_task, "args": trap_task["args"]},  # square with the trap's arguments
              trap_id: {**trap_task, "fn": square_task["fn"]}}        # the same pair, the other seal
    for tid, task in forged.items():
        writer.set(input_key(tid), encode_raw(task))
    writer.set(input_key(replay_id), finished_input)  # a finished call's input under another task
    gate.touch()
    assert holder.result(timeout=30) == "held"
    refusals = ["not signed together", "not signed together", f"sealed for task {finished_id}, not for {replay_id}"]
    for future, says in zip(calls, refusals, strict=True):
        with pytest.raises(SignatureError, match=says):
            future.result(timeout=30)
    assert not trap.exists(), "a recombined call's arguments were unpickled"
    assert log.read_text() == "2\n", "the replayed call ran again"
    writer.close()
    figures["tampered_payloads_refused"] += 3


@pytest.mark.timeout(60)
def test_attach_refuses_outputs_swapped_together_with_their_inputs(make_grid, make_connector, figures):
    """The issue's attack: inputs and outputs of ``square(3)`` and ``square(4)`` swapped in the
    data plane, and ``attach()`` answered 16 for ``square(3)``. Outputs are signed for their task
    id; attach checks them against the bindings its records hold (and, for a record without
    them, against the task's sealed input)."""
    grid = make_grid(workers=1)
    connector = make_connector(grid)
    writer = _data_plane_writer(grid)
    sessions = []
    for _ in range(2):
        tasks = [_executor_task(grid, fault_tasks.square, 3), _executor_task(grid, fault_tasks.square, 4)]
        response = connector.send(tasks)
        sessions.append((response, [task_binding(task) for task in tasks]))
    for response, _ in sessions:
        wait_for(lambda r=response: grid.table.session_info(r["session_id"])["finished"] == 2, timeout=30)
        first, second = response["task_ids"]
        for key_of in (input_key, output_key):
            a, b = writer.get(key_of(first)), writer.get(key_of(second))
            writer.set(key_of(first), b)
            writer.set(key_of(second), a)
    (kept, bindings), (bare, _) = sessions
    # a record as HTCGridExecutor.sessions() writes it: with the bindings the client made
    for records in ([{**kept, "bindings": bindings}], [bare]):
        for future in HTCGridExecutor.attach(records, config=grid.client_config, broken_after_sec=10):
            with pytest.raises(SignatureError, match="another task"):
                future.result(timeout=30)
    writer.close()
    figures["tampered_payloads_refused"] += 4


# ------------------------------------------------------------------------------- Redis ACL roles


_ADMIN_ONLY = [
    ("CONFIG", "SET", "dir", "/tmp"),
    ("CONFIG", "GET", "requirepass"),
    ("MODULE", "LOAD", "/tmp/htcgrid-no-such-module.so"),
    ("DEBUG", "SLEEP", "0"),
    ("SAVE",),
    ("BGSAVE",),
    ("REPLICAOF", "127.0.0.1", "1"),
    ("ACL", "LIST"),
    ("CLIENT", "LIST"),
    ("KEYS", "*"),
    ("FLUSHALL",),
    ("SHUTDOWN", "NOSAVE"),
]


def _role_clients(grid):
    """A client per credential that leaves the grid process: the client config's data-plane URL,
    the joining agents' URL (in the config too) and what the grid hands its own agents."""
    config = grid.client_config
    agent_env = json.loads(_environ(grid.agent_pids()[0])[AGENT_CONFIG_ENV])
    urls = {"client": config["redis_url"], "joining agent": config["htcgrid_redis_control_url"],
            "agent": agent_env["redis_url"]}
    return {role: redis.Redis.from_url(url, socket_timeout=5) for role, url in urls.items()}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_no_role_can_configure_redis_load_a_module_or_save_files(make_grid, figures):
    """The issue's attack: with the data-plane password, MODULE LOAD ran code in redis-server and
    CONFIG SET dir + SAVE wrote files. Every role's credentials are refused those commands."""
    grid = make_grid(workers=1)
    before = grid.redis.config_get("dir")["dir"]
    for role, client in _role_clients(grid).items():
        assert client.ping(), role
        for command in _ADMIN_ONLY:
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
            figures["unauthorised_requests_refused"] += 1
        client.close()
    assert grid.redis.config_get("dir")["dir"] == before
    assert grid.redis.ping()  # still up: SHUTDOWN was refused too


def test_a_data_plane_client_can_only_touch_data_plane_keys_and_runs_no_script(make_grid, make_executor,
                                                                               figures):
    grid = make_grid(workers=1)
    assert make_executor(grid).submit(fault_tasks.square, 3).result(timeout=30) == 9
    client = _role_clients(grid)["client"]
    client.set("s-1_0-input", b"x")  # its own keys: yes
    assert client.get("s-1_0-input") == b"x"
    refused = [
        lambda: client.get(key_for("queues")),
        lambda: client.set(key_for("task", "s-1_0"), b"pending"),
        lambda: client.lpush(key_for("queue", "0"), "s-1_0"),
        lambda: client.eval("return 1", 0),
        lambda: client.evalsha("0" * 40, 0),  # the state table's scripts: not for clients
        lambda: client.set("canary", b"not a data-plane key"),
    ]
    for attempt in refused:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
        figures["unauthorised_requests_refused"] += 1
    client.close()


def test_the_admin_password_never_leaves_the_grid_process(make_grid):
    grid = make_grid(workers=2)
    admin = grid.redis_server.password
    assert admin not in json.dumps(grid.client_config)
    for pid in [*grid.agent_pids(), grid.redis_server.pid, grid.control_plane_stats()["pid"]]:
        assert admin not in json.dumps(_environ(pid)), f"pid {pid} has the admin password"
