"""Reports of runs: loss and AP curves as PNG (:mod:`.plot`, ``mfdetr plot``) and the end-to-end demo
on the synthetic set with its summary (:mod:`.demo`, ``mfdetr demo``)."""
