"""From records to counts, the forward side of the data path: the conversation format shared by SFT
and probing (``conversation``), greedy continuations for the generated scope (``generation``), the
one place that touches hooks (``recorder``), the streaming recording that returns a Snapshot
(``probe``: ``record``) with its host-side rows (``host_rows``), and the response loss on held-out
records (``response_loss``)."""
