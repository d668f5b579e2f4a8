"""Thin experiment scripts over the probing API, each reachable as ``mechprobe <name>``.

| name | what it answers |
|---|---|
| demo | the toy's test split under the baseline and every model-only defense |
| mechanisms | how each defense works (shift vs discrimination) |
| ensembles | which pairs to combine, predicted and measured |
| layerwise | where in depth each defense acts |
| modality | the multimodal safety gap per layer |
| generation_check | whether the one-forward readout predicts generated refusals |
"""

EXPERIMENTS = ("demo", "mechanisms", "ensembles", "layerwise", "modality", "generation_check")
