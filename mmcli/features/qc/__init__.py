"""What happens to a slide's tiles before they are encoded: artefact QC (:mod:`.artifacts`), stain normalisation
(:mod:`.stain`), annotations in (:mod:`.annotations`), learned tissue / artefact segmentation
(:mod:`.segmentation`) and the per-tile QC record kept beside the store (:mod:`.record`)."""
