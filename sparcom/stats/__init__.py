"""From counts to numbers, with no forward pass: ISN selection (``select``), pure metrics on sets
(``metrics``), streamed tallies of snapshots (``analysis``), chance levels, intervals and layer
phases (``estimates``), resampling passes (``resampling``), permutation tests (``permutation``),
and the comparison of two snapshots every report renders (``comparison``)."""
