from __future__ import annotations

import pytest

from bus.broker import topic_matches
from tests.support import ROUTING_TABLE


@pytest.mark.parametrize(("pattern", "routing_key", "routed"), ROUTING_TABLE)
def test_topic_match_follows_rabbitmq(pattern: str, routing_key: str, routed: bool) -> None:
    assert topic_matches(pattern, routing_key) is routed
