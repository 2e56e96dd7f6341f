import pytest

from dcache.eval.policy_spec import format_policy, parse_policies


def test_parses_names_and_literal_options():
    got = parse_policies("static, taylorseer(interval=4, order=2),fbcache(threshold=0.1)")
    assert got == [("static", {}), ("taylorseer", {"interval": 4, "order": 2}), ("fbcache", {"threshold": 0.1})]
    assert parse_policies(format_policy("taylorseer", {"interval": 4})) == [("taylorseer", {"interval": 4})]


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("static;fbcache", "not ';'"),
        ("taylorseer(interval=4", "unclosed '('"),
        ("static)", "unbalanced ')'"),
        ("static,nope", "unknown policy 'nope'; accepted:"),
        ("static(3)", "write name(key=value"),
        ("taylorseer(intervl=3)", "unknown option(s) ['intervl']"),
        ("taylorseer(interval=3,interval=4)", "given twice"),
        ("", "no policies given"),
        ("kv-full", "not image"),
    ],
)
def test_bad_lists_name_what_is_accepted(spec, needle):
    with pytest.raises(ValueError) as e:
        parse_policies(spec, task="image")
    assert needle in str(e.value)


def test_task_vocabulary_and_extra_names():
    assert parse_policies("baseline,kv-rolling", task="ar-video", extra_names=("baseline",))[0] == ("baseline", {})
