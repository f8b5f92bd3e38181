from __future__ import annotations

import pytest
from tests.support import ROUTING_TABLE

from bus.broker import topic_matches


@pytest.mark.parametrize(("pattern", "routing_key", "routed"), ROUTING_TABLE)
def test_topic_match_follows_rabbitmq(pattern: str, routing_key: str, routed: bool) -> None:
    assert topic_matches(pattern, routing_key) is routed
