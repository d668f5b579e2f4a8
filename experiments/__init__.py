"""Thin experiment scripts over the probing API, each reachable as ``mechprobe <name>``.

| name | what it answers |
|---|---|
| study | the paper's whole analysis over a combined benchmark (config file or flags), report.md + report.html |
| demo | the study on the embedded toy |
| mechanisms | how each defense works (shift vs discrimination) |
| ensembles | which pairs to combine, predicted and measured |
| layerwise | where in depth each defense acts |
| modality | the multimodal safety gap per layer |
| generation_check | whether the one-forward readout predicts generated refusals |
"""

EXPERIMENTS = ("study", "demo", "mechanisms", "ensembles", "layerwise", "modality", "generation_check")
