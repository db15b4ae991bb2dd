"""The generated demo marketplace: catalog, photos, titles, click model, styles."""
