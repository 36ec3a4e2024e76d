"""Counting the records a DHT node refuses: forged signatures, malformed or oversized values.

hivemind's validators drop a bad record without a trace, which is right for a training peer but hides
a hostile or broken peer from the people watching the run. `install(dht, ...)` swaps the node's
composite validator for a `CountingValidator` that applies the same validators in the same order and
remembers each distinct record it refused, by reason; `counts(dht)` reads the tally.

hivemind checks the entries of a dictionary answer one by one and drops the whole answer at the first
bad one, so a node that serves several bad records is counted for the first of them at each request.
The validator runs inside the DHT's own process: both functions reach it through `run_coroutine`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from functools import partial

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord

REASONS = ("forged", "malformed", "oversized")
"""forged: a signature that does not match its `[owner:...]` key; malformed: a value the run's schemas
refuse; oversized: a refused value larger than `max_bytes` under one of the watched keys."""


class CountingValidator(CompositeValidator):
    """A CompositeValidator that counts distinct refused records by reason (see `REASONS`).

    Args:
        validators: the node's validators, already merged and sorted (`CompositeValidator._validators`).
        sizes: DHT key -> largest value (bytes) accepted under it; a larger one is refused as oversized.
        remember: how many distinct refused records to remember (older ones may be counted again).
    """

    def __init__(self, validators, *, sizes: dict[str, int], remember: int = 4096):
        super().__init__()
        self._validators = list(validators)
        self._sizes = {DHTID.generate(source=key).to_bytes(): limit for key, limit in sizes.items()}
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._remember = remember
        self.counts = dict.fromkeys(REASONS, 0)

    def validate(self, record: DHTRecord) -> bool:
        limit = self._sizes.get(record.key)
        if limit is not None and len(record.value) > limit:
            return self._refuse(record, "oversized")
        for i, validator in enumerate(reversed(self._validators)):  # as CompositeValidator does
            if not validator.validate(record):
                forged = isinstance(validator, RSASignatureValidator)
                return self._refuse(record, "forged" if forged else "malformed")
            if i < len(self._validators) - 1:
                record = DHTRecord(
                    record.key, record.subkey, validator.strip_value(record), record.expiration_time
                )
        return True

    def _refuse(self, record: DHTRecord, reason: str) -> bool:
        digest = hashlib.sha256(b"\0".join((record.key, record.subkey or b"", record.value))).digest()
        if digest not in self._seen:
            self.counts[reason] += 1
            self._seen[digest] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
        return False


def install(dht: hivemind.DHT, *, sizes: dict[str, int]) -> None:
    """Count what `dht` refuses from now on (its validators stay as they are). Idempotent."""
    dht.run_coroutine(partial(_install, sizes=sizes))


def counts(dht: hivemind.DHT) -> dict[str, int]:
    """Distinct records `dht` refused so far, by reason (zeros before `install`)."""
    return dht.run_coroutine(_counts)


async def _install(_dht: hivemind.DHT, node, sizes: dict[str, int]) -> None:
    # hivemind keeps the validator on the protocol and reads it there at every check (pinned ==1.1.12)
    current = node.protocol.record_validator
    if not isinstance(current, CountingValidator):
        node.protocol.record_validator = CountingValidator(current._validators, sizes=sizes)


async def _counts(_dht: hivemind.DHT, node) -> dict[str, int]:
    validator = node.protocol.record_validator
    return dict(validator.counts) if isinstance(validator, CountingValidator) else dict.fromkeys(REASONS, 0)
