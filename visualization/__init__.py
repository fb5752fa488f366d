"""See what the model sees: attention capture and pictures, prediction overlays, training curves.

* ``capture.py``: :class:`AttentionCapture`, the tensors the attention blocks compute, for one forward pass;
* ``attention_maps.py``: PNGs of those (coordinate gates, routing, token/window attention, channel weights);
* ``overlays.py``: prediction pictures (classification tiles, detection boxes and masks, segmentation label maps);
* ``callbacks.py``: :class:`ValidationOverlays`, overlays of fixed validation images logged every epoch;
* ``curves.py``: :func:`plot_training_curves`, ``<run>/curves.png`` from ``metrics.csv``.

Modules are imported on use (``from visualization.curves import plot_training_curves``), so importing a task
does not pull in matplotlib.
"""
