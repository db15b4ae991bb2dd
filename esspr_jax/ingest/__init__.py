"""Reading what users bring: click-log schema, the catalog (one reader), the eSSPR release format, counted skips, Beam pair mining."""
