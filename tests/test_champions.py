"""A champion belongs to one bot: a model of other responses never replaces it silently, each
``--model_name`` has its own champion, grown data of the same bot still promotes, and registering
the same run twice (a retry) leaves one version."""

import pytest

from retrieval.build import build_table
from tasks import registry
from tasks.promotion import MIN_SHARED_RESPONSES, register_and_promote, shared_responses
from tasks.training import train_head
from tests.conftest import INTENTS
from tests.test_training import load_records_list

OTHER_BOT = {  # another team's bot: none of its responses is one of INTENTS'
    "opening_hours": (
        "We are open 9 to 17, Monday to Friday.",
        [
            "when are you open",
            "opening hours?",
            "are you open on monday",
            "what time do you close",
            "hours of business",
            "until when are you open",
        ],
    ),
    "parking": (
        "Free parking is behind the building, entrance on Mill Street.",
        ["where can I park", "is there parking", "parking options?", "can I park nearby", "free parking?", "where is the car park"],
    ),
    "wifi": (
        "The guest wifi is 'Visitors', no password needed.",
        ["what is the wifi", "wifi password?", "can I get internet", "guest wifi name", "how do I connect to wifi", "is there wifi here"],
    ),
}
TRAIN = {"epochs": 30, "lr": 5e-3, "val_split": 0.25}
HEAD = {"hidden_dim": 64, "dropout": 0.0}


def _records(intents: dict) -> list[dict]:
    return [{"user": u, "assistant": resp, "intent": name} for name, (resp, asks) in intents.items() for u in asks]


def _train(tmp_path, intents: dict, name: str) -> tuple[str, int, dict]:
    db = str(tmp_path / name)
    version = build_table(load_records_list(_records(intents)), db, "conversations").version
    return db, version, train_head.fn(db, "conversations", version, TRAIN, HEAD)


def _promote(db, version, run, **kw) -> dict:
    return register_and_promote.fn(
        run["run_id"], db, "conversations", version, run["val_ids"], run["val_response_acc"], val_right=run["val_right"], **kw
    )


def test_shared_responses_over_the_smaller_set():
    def meta(*texts: str) -> dict:
        return {"candidates": {"texts": [*texts, None]}}  # None: an "other" slot

    assert shared_responses(meta("A", "B"), meta("a ", "b", "C", "D")) == 1.0  # grown: every old one kept
    assert shared_responses(meta("A", "B", "C", "D"), meta("A", "X")) == 0.5
    assert shared_responses(meta("A"), meta("B")) == 0.0 and MIN_SHARED_RESPONSES == 0.5


def test_another_bots_model_does_not_replace_the_champion_without_the_flag(tmp_path, mlflow_store, prefect_harness):
    db, v, first = _train(tmp_path, INTENTS, "support")
    assert _promote(db, v, first)["promoted"] is True

    other_db, other_v, other = _train(tmp_path, OTHER_BOT, "frontdesk")
    kept = _promote(other_db, other_v, other)
    assert (kept["version"], kept["promoted"], kept["shared_responses"]) == (2, False, 0.0)
    assert kept["reason"].startswith(
        "it shares 0% of its responses with champion v1 (under 50%), so it looks like another bot; champion kept"
    )
    assert registry.champion_version() == 1
    tags = registry.client().get_model_version(registry.MODEL_NAME, "2").tags
    assert tags["shared_responses_with_champion"] == "0.0000" and tags["promotion"] == kept["reason"]

    # Under its own name it is its own bot, with its own champion; the first bot's is untouched.
    own = _promote(other_db, other_v, other, model_name="frontdesk")
    assert (own["version"], own["promoted"], own["reason"]) == (1, True, "no champion yet")
    assert registry.champion_version("frontdesk") == 1 and registry.champion_version() == 1

    # Asked for explicitly, it takes over, and says so.
    taken = _promote(other_db, other_v, train_head.fn(other_db, "conversations", other_v, TRAIN, HEAD), replace_champion=True)
    assert taken["promoted"] is True and registry.champion_version() == 3
    assert "replaces another bot's champion: 0% of responses shared; --replace_champion" in taken["reason"]


def test_grown_data_of_the_same_bot_still_promotes(tmp_path, mlflow_store, prefect_harness):
    weak_db, weak_v, _ = _train(tmp_path, dict(list(INTENTS.items())[:2]), "small")
    weak = train_head.fn(weak_db, "conversations", weak_v, {**TRAIN, "epochs": 1, "lr": 1e-6, "early_stop_patience": 0}, {"hidden_dim": 64})
    assert _promote(weak_db, weak_v, weak)["promoted"] is True

    db, v, grown = _train(tmp_path, {**INTENTS, **OTHER_BOT}, "grown")  # two of its responses were the champion's
    result = _promote(db, v, grown)
    assert result["shared_responses"] == 1.0 and result["promoted"] is True, result["reason"]


def test_a_retried_registration_leaves_one_version(tmp_path, mlflow_store, prefect_harness):
    db, v, run = _train(tmp_path, INTENTS, "support")
    first = _promote(db, v, run)
    again = _promote(db, v, run)  # as Prefect's retry would, after a failure past registration
    assert (first["version"], again["version"]) == (1, 1)
    assert again["promoted"] is True and again["reason"] == "already champion (a retry of this registration)"
    assert [x["version"] for x in registry.list_versions()] == [1]


def test_cli_commands_take_the_bot_name(tmp_path, mlflow_store, capsys):
    from interfaces.cli import build_parser, main

    for argv in (
        ["pipeline", "--data", "x.jsonl"],
        ["finetune"],
        ["size-sweep"],
        ["retrain", "--data_dir", "d"],
        ["chat"],
        ["serve"],
        ["eval", "--data", "x"],
        ["registry", "list"],
    ):
        assert build_parser().parse_args([*argv, "--model_name", "frontdesk"]).model_name == "frontdesk"
    assert main(["registry", "list", "--model_name", "frontdesk"]) == 0
    assert "no versions of 'frontdesk' registered yet" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--model_name", "bad name'"])
    assert main(["chat", "--model_name", "frontdesk"]) == 2
    assert "--model 'models:/frontdesk@champion' could not be loaded" in capsys.readouterr().err
