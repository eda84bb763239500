"""Label quality: labelers against human pairs (``pairs_file``, ``evaluate``), weights fitted on
them (``fit_weights``, ``fitted_recipe``) and the table a person reads (``report``)."""
