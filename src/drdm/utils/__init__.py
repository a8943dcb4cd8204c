"""Helpers shared by the scripts and modules, one module each (imported by module, so that the
pure ones stay free of Hydra): ``atomic`` (atomic writes), ``errors`` (the scripts' one-line
errors), ``figures``, ``instantiate`` (Hydra instantiation: ``build``, ``to_plain``),
``progress`` (progress bars) and ``seeds`` (``mix_seed``)."""
