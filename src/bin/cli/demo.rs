use triattn::error::{Error, Result};

use crate::DemoArgs;

pub fn demo(_a: DemoArgs) -> Result<()> {
    Err(Error::unsupported("demo: being written"))
}
