"""Localized recovery: the plan every rank agrees on (``plan``), the transfers it needs (``transfer``),
one rank's side of it (``coordinator``), the stage protocol it drives (``stage``) and its records (``records``)."""
