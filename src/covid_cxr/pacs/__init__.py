"""The PACS round trip over DICOMweb: find studies, predict their radiographs, store the SR and
SC results back in each study; once on demand (`covid-cxr pacs process`) or as a watcher that
handles every new study exactly once (`covid-cxr pacs watch`)."""
