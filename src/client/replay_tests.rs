//! Client replay tests against canned transcript bytes.
