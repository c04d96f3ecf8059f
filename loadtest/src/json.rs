//! The JSON files a run leaves behind (`make bench` results, ceilings, RSS), written and read
//! back by the summary.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|err| Error::io(parent.display(), err))?;
    }
    let json = serde_json::to_vec_pretty(value).map_err(|source| Error::Json {
        path: path.display().to_string(),
        source,
    })?;
    std::fs::write(path, json).map_err(|err| Error::io(path.display(), err))
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read(path).map_err(|err| Error::io(path.display(), err))?;
    serde_json::from_slice(&text).map_err(|source| Error::Json {
        path: path.display().to_string(),
        source,
    })
}
