"""docker/prometheus/alerts.yml: valid, unit-tested alert by alert with promtool, and built on metrics that exist."""

from __future__ import annotations

import re
import subprocess

from containerfiles import ALERTS, load_yaml, tool

from service.metrics import Metrics

UNIT_TESTS = ALERTS.with_name("alerts_test.yml")


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    promtool = tool("promtool", "apt-get install prometheus")
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run([promtool, "test", "rules", UNIT_TESTS.name], capture_output=True, text=True,
                           cwd=UNIT_TESTS.parent)  # fmt: skip
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_every_alert_has_a_unit_test_that_expects_it_to_fire():
    fired = {
        case["alertname"]
        for test in load_yaml(UNIT_TESTS)["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in alert_rules()} == fired


def test_the_rules_use_only_metrics_the_server_exports():
    exported = {metric.name for metric in Metrics().registry.collect()}
    exported |= {f"{name}_total" for name in exported} | {f"{name}_bucket" for name in exported}
    used = {name for rule in alert_rules() for name in re.findall(r"\bsrvit_[a-z_]+", rule["expr"])}
    assert used and used <= exported, used - exported
