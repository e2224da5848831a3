//! The runtime's JSON values (workers, events) as Python objects.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// A JSON value of the runtime's (a worker, an event) as Python objects.
pub fn from_json<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    use serde_json::Value as V;
    Ok(match v {
        V::Null => py.None().into_bound(py),
        V::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        V::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_pyobject(py)?.into_any(),
            (None, Some(i)) => i.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        V::String(s) => s.into_pyobject(py)?.into_any(),
        V::Array(items) => {
            let l = PyList::empty(py);
            for x in items {
                l.append(from_json(py, x)?)?;
            }
            l.into_any()
        }
        V::Object(map) => {
            let d = PyDict::new(py);
            for (k, x) in map {
                d.set_item(k, from_json(py, x)?)?;
            }
            d.into_any()
        }
    })
}
