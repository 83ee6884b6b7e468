"""Workflows: commands that compose the verbs of :mod:`mmcli.stages` (``demo``: synth -> extract -> fit ->
report; a study file). They sit between the CLI and the stages, so no verb imports another verb."""
