"""Disabling a provider reaches every process through the database (SPEC §11): real `vidgate serve`
processes with a providers file of two providers, each in front of its own `vidgate simulator`.

After an operator disables the first provider in one process (another replica's API, or the CLI), a
replica's submits go to it only until that replica reads the providers' state again (app/providers/
health.py, at most every second), then never again until it is enabled; the predictions already in
flight there are polled there to the end. Asserted as an order (no submit to it after the first one to
the other provider), never as a time.

On PostgreSQL: two serve replicas, the switch in one, the submits in the other. On SQLite (one serve
process per file is the supported shape): one serve process and the CLI as the other process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import TEST_DB
from tests.procs import Gateway, Procs, Simulator, base_env, fresh_database, gateway_env, running_simulator, until

# Fixtures: pytest finds them in this module's namespace (`x as x` marks them as used on purpose).
from tests.procs import proc_cwd_fixture as proc_cwd_fixture
from tests.procs import procs_fixture as procs_fixture

pytestmark = pytest.mark.slow

MAX_SUBMITS_UNTIL_SEEN = 400  # a bound on the loop, not a speed claim: the switch is read every second


def providers_file(directory: Path, first: Simulator, second: Simulator) -> Path:
    path = directory / "providers.toml"
    path.write_text(
        f"""
routing = "priority"

[[providers]]
name = "first"
kind = "vibedream"
base_url = "{first.url}"
api_key_env = "SWITCH_FIRST_KEY"
priority = 1
output_hosts = ["{urlsplit(first.url).netloc}"]

[[providers]]
name = "second"
kind = "vibedream"
base_url = "{second.url}"
api_key_env = "SWITCH_SECOND_KEY"
priority = 2
output_hosts = ["{urlsplit(second.url).netloc}"]
"""
    )
    return path


@pytest.fixture
async def two_simulators(procs: Procs) -> AsyncIterator[tuple[Simulator, Simulator]]:
    async with (
        running_simulator(procs, completion_s=2.0, estimated_time="1-2s") as first,
        running_simulator(procs, completion_s=2.0, estimated_time="1-2s") as second,
    ):
        yield first, second


async def test_a_disable_reaches_every_process_and_in_flight_goes_on(
    procs: Procs, tmp_path_factory: pytest.TempPathFactory, two_simulators: tuple[Simulator, Simulator]
) -> None:
    first, second = two_simulators
    directory = Path(tmp_path_factory.mktemp("switch"))
    async with fresh_database(procs, tmp_path_factory, "vidgate_switch") as db:
        env = gateway_env(
            db,
            first,
            VIDGATE_PROVIDERS_FILE=str(providers_file(directory, first, second)),
            VIDGATE_UPSTREAM_API_KEY=None,
            SWITCH_FIRST_KEY="first-key",
            SWITCH_SECOND_KEY="second-key",
            VIDGATE_OUTPUT_HOSTS=f"{urlsplit(first.url).netloc},{urlsplit(second.url).netloc}",
        )
        submitter = await procs.serve(env, name="serve-b")
        switcher: Gateway | None = await procs.serve(env, name="serve-a") if TEST_DB == "postgresql" else None
        cli_env = base_env(**{k: v for k, v in env.items() if k.startswith(("VIDGATE_", "SWITCH_"))})

        async def switch(verb: str) -> None:
            if switcher is not None and verb == "disable":
                answer = await switcher.admin("POST", f"/admin/v1/providers/first/{verb}")
                assert answer.status_code == 200, answer.text
                assert answer.json()["state"]["enabled"] is False
                return
            done = await procs.run("providers", verb, "first", "--json", env=cli_env)
            assert done.returncode == 0, done.tail()

        _, key = await submitter.tenant(budgetCents=100_000)
        before = [await submitter.submit_ok(key) for _ in range(3)]
        assert {p["provider"] for p in before} == {"first"}

        await switch("disable")
        order: list[str] = []
        while "second" not in order:
            assert len(order) < MAX_SUBMITS_UNTIL_SEEN, "the disable never reached the other process"
            order.append((await submitter.submit_ok(key))["provider"])
        after = [await submitter.submit_ok(key) for _ in range(10)]
        order += [p["provider"] for p in after]
        first_second = order.index("second")
        assert set(order[:first_second]) <= {"first"} and set(order[first_second:]) == {"second"}, order
        listed = await submitter.admin("GET", "/admin/v1/providers")
        assert [p["state"]["enabled"] for p in listed.json()["data"]] == [False, True]

        # What was in flight at the disabled provider goes on there, to the end.
        await until(lambda: submitter.all_done(key, {p["id"] for p in before}), 60, "the first provider's predictions")
        for prediction_id in {p["id"] for p in before}:
            done = await submitter.prediction(key, prediction_id)
            assert done["provider"] == "first" and done["status"] == "completed"

        # Enabled again (by the CLI): new submits go back to it.
        await switch("enable")
        back: list[str] = []
        while "first" not in back:
            assert len(back) < MAX_SUBMITS_UNTIL_SEEN, "the enable never reached the other process"
            back.append((await submitter.submit_ok(key))["provider"])
        stats = await first.stats(), await second.stats()
        # Each simulator saw exactly the submits the answers said it took: nothing was sent twice.
        assert stats[0]["submits"] == len(before) + order.count("first") + back.count("first")
        assert stats[1]["submits"] == order.count("second") + back.count("second")
