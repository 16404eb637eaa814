"""The asyncio interface: the same client, producer and consumer as
:mod:`shoal`, with coroutines.

    async with shoal.aio.Client("127.0.0.1:9400") as c:
        async with shoal.aio.Producer(c) as p:
            meta = await p.send_and_wait("t", b"value")
        async with shoal.aio.Consumer(c) as cons:
            await cons.assign_all("t", start="beginning")
            records = await cons.poll(timeout=1.0)

Every object belongs to the event loop it was first used on.
"""

from .client import Client, parse_bootstrap
from .consumer import Consumer, Start, Timestamp
from .producer import Delivery, Producer, RecordMetadata, fnv1a

__all__ = [
    "Client",
    "Consumer",
    "Delivery",
    "Producer",
    "RecordMetadata",
    "Start",
    "Timestamp",
    "fnv1a",
    "parse_bootstrap",
]
