"""A hook that is handed the cache's live streams, as the metrics are (``hooks=[seen]``),
so that a test can wait for a state of single-flight without sleeping for it: followers
joined, a stream taken over, none left."""

from __future__ import annotations

from typing import Any


class FlightsSeen:
    """The live streams of every cache this hook was given to."""

    def __init__(self) -> None:
        #: Each cache's registry of live streams (a :class:`sse_cache.flight.Flights`).
        self.flights: list[Any] = []

    def __call__(self, notice: Any) -> None:
        pass

    def watch(self, live: Any) -> None:
        self.flights.append(live)

    def live(self) -> list[Any]:
        """The live streams offered to identical requests now."""
        return [flight for flights in self.flights for flight in flights]

    def followers(self) -> int:
        """How many requests follow a live stream now."""
        return sum(flight.followers for flight in self.live())

    def taken_over(self) -> bool:
        """Whether a live stream's producer's client has gone while its readers read on
        (its upstream is read for them)."""
        return any(not flight.flight.producer_reading for flight in self.live())
