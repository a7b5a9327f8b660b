"""Schemathesis against the service's own OpenAPI document, with authentication off and on: no
5xx, and every answer matches the document (status code, content type, body schema); with
authentication on, a request without the key or with a wrong one must get 401.

Generated requests (schema-valid and schema-violating) go to a real uvicorn server. The
budget is fixed (``EXAMPLES`` per operation and mode, derandomized so CI is repeatable);
``BS_COORDINATION_FUZZ_EXAMPLES`` raises it for a longer local run.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from security_helpers import auth

from bs_coordination.models import MAX_WAIT_SECONDS

#: Examples per operation and authentication mode (about 12 operations x 2 modes).
EXAMPLES = int(os.environ.get("BS_COORDINATION_FUZZ_EXAMPLES", "150"))
#: Longest a generated request may queue for a device (``wait``): the budget is time.
MAX_WAIT = 0.2


#: ``positive_data_acceptance`` expects every schema-valid request to succeed, but some lock
#: rules span fields or state and no JSON Schema can say them (name one device *or* a list;
#: names in a list must not overlap; queue locks need a lease; a presented key must hold
#: something): those answer 422/404/409 with a message naming the rule, as documented.
EXCLUDED = [schemathesis.checks.positive_data_acceptance]


def _bounded(case: Any) -> None:
    """Keep a generated ``wait`` short: a request that queues for an hour proves nothing more
    than one that queues for 0.2 s, and would spend the whole budget."""
    body = case.body
    wait = body.get("wait") if isinstance(body, dict) else None
    # Only valid waits: an out-of-range one is refused at once, and must stay out of range.
    if isinstance(wait, (int, float)) and not isinstance(wait, bool) \
            and MAX_WAIT < wait <= MAX_WAIT_SECONDS:
        body["wait"] = MAX_WAIT


def fuzz(base_url: str, api_key: str | None, seen: Counter[tuple[str, int]]) -> list[str]:
    """Fuzz every operation of the service at ``base_url``; the failures, one text each.
    ``seen`` counts the answers by (operation, status)."""
    headers = auth(api_key) if api_key else {}
    doc = httpx.get(base_url + "/openapi.json", headers=headers, timeout=30).json()
    config: dict[str, Any] = {
        # FastAPI ignores query parameters it does not know (as the original service did);
        # the document does not promise to refuse them.
        "generation": {"allow-extra-parameters": False},
    }
    if api_key:
        # Through the document's own security scheme, so that schemathesis knows the header is
        # the key: it also sends requests without it and with a wrong one, expecting 401.
        config["auth"] = {"openapi": {"ApiKey": {"api_key": f"ApiKey {api_key}"}}}
    schema = schemathesis.openapi.from_dict(doc, config=SchemathesisConfig.from_dict(config))
    failures: list[str] = []
    with requests.Session() as session:
        session.trust_env = False  # never through an environment proxy
        for result in schema.get_all_operations():
            operation = result.ok()
            strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                                 operation.as_strategy(GenerationMode.NEGATIVE))

            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), print_blob=False)
            @given(case=strategy)
            def run(case: Any) -> None:
                _bounded(case)
                response = case.call_and_validate(base_url=base_url, session=session, timeout=15,
                                                  excluded_checks=EXCLUDED)
                seen[(case.operation.label, response.status_code)] += 1

            try:
                run()
            except Exception as exc:  # collected: one report for every operation that failed
                failures.append(f"{operation.label}: {exc}")
    return failures


@pytest.mark.parametrize("mode", ["auth off", "auth on"])
def test_schemathesis_finds_nothing(service_factory, key_file, keys, mode: str) -> None:
    if mode == "auth on":
        svc = service_factory("memory", api_keys=str(key_file))
        api_key: str | None = keys["root"]
    else:
        svc = service_factory("memory")
        api_key = None
    started = time.monotonic()
    seen: Counter[tuple[str, int]] = Counter()
    failures = fuzz(svc.url, api_key, seen)
    assert not failures, "\n\n".join(failures)
    # Not a vacuous pass: the key was sent and real work was done (locks granted, listed).
    assert seen[("POST /api/lock/request", 200)] > 0 and seen[("GET /api/locks/status", 200)] > 0, seen
    assert not [k for k in seen if k[1] >= 500]
    # The service survived the run.
    assert httpx.get(svc.url + "/api/health/ready").json()["status"] == "ready"
    assert time.monotonic() - started < 90, "the fuzz run outgrew its budget"
