"""Controller guards: bearer token, Unix socket, exposure refusal, -allow-dst."""

from __future__ import annotations

from pathlib import Path

from tests.support import run_cli, running_server


def test_token_is_required_and_checked() -> None:
    with running_server("-c-token", "s3cret") as server:
        status, reply = server.control({"opt": 9})
        assert (status, reply) == (
            401,
            {
                "res": 2,
                "err_string": "missing or wrong bearer token",
                "current_users": 0,
                "revision": 0,
            },
        )
        status, _ = server.control({"opt": 9}, headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, _ = server.control({"opt": 9}, headers={"Authorization": "Basic s3cret"})
        assert status == 401
        server.token = "s3cret"
        server.add("/u", "127.0.0.1:9")
        assert server.control({"opt": 9}) == (
            200,
            {"res": 1, "err_string": "", "current_users": 1, "revision": 1},
        )
        assert "missing or wrong bearer token" in server.log_text()


def test_token_from_the_environment() -> None:
    with running_server(env={"MTT_CONTROLLER_TOKEN": "from-env"}) as server:
        assert server.control({"opt": 9})[0] == 401
        server.token = "from-env"
        assert server.control({"opt": 9})[0] == 200


def test_controller_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with running_server(controller=str(path)) as server:
        assert server.controller == str(path)
        assert (path.stat().st_mode & 0o777) == 0o660
        server.add("/u", "127.0.0.1:9")
        assert server.control({"opt": 9})[1]["current_users"] == 1


def test_open_controller_on_all_addresses_refuses_to_start() -> None:
    result = run_cli("-b", "127.0.0.1:0", "-c", "0.0.0.0:0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "reachable from the network without a token" in line and "-c-token" in line


def test_insecure_flag_allows_it_explicitly() -> None:
    with running_server("-c-insecure", controller="0.0.0.0:0") as server:
        server.controller = "127.0.0.1:" + server.controller.rsplit(":", 1)[1]
        assert server.control({"opt": 9})[0] == 200


def test_allow_dst_rejects_outside_destinations_atomically() -> None:
    with running_server(
        "-allow-dst", "127.0.0.0/8:10000-19999", "-allow-dst", "[::1]/128"
    ) as server:
        server.add("/ok", "127.0.0.1:10001")
        server.add("/v6", "[::1]:22")
        status, reply = server.control(
            {
                "opt": 1,
                "args_bunch": [
                    {"path": "/a", "dst": "127.0.0.1:10002"},
                    {"path": "/b", "dst": "169.254.169.254:80"},
                ],
            }
        )
        assert status == 400
        assert reply["err_string"] == (
            'args_bunch[1].dst "169.254.169.254:80" is outside the allowed destinations '
            "(127.0.0.0/8:10000-19999, ::1/128)"
        )
        assert reply["current_users"] == 2
        status, reply = server.control(
            {"opt": 1, "args_bunch": [{"path": "/h", "dst": "localhost:10001"}]}
        )
        assert status == 400 and "must be an IP address" in reply["err_string"]
