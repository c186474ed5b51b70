"""Analysis passes: criteria that write ``node.meta["chop"]["saliency"]`` on weight nodes."""
