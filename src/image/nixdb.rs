//! The Nix database of the image's store: the closure registered as valid with its NAR hashes, sizes,
//! derivers and references, in the schema Nix (2.x, schema 10) creates, so that `nix-store --verify
//! --check-contents` passes on the booted machine and nix-daemon takes it over. The SQL is generated
//! here (pure, sorted, fixed registration time); the sqlite3 shell writes the file.

use super::closure::Closure;
use crate::error::{Error, Result};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Nix's schema version, written to `db/schema` (Nix reads it before opening the database).
pub const SCHEMA_VERSION: &str = "10";

/// As Nix 2.x's schema.sql creates it (`sqlite3 db.sqlite .schema` of a fresh store).
const SCHEMA: &str = "\
create table ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies \"false\"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);
create table Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
create index IndexReferrer on Refs(referrer);
create index IndexReference on Refs(reference);
create trigger DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;
create table DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually \"out\"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);
create index IndexDerivationOutputs on DerivationOutputs(path);
";

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The whole database as SQL: ids follow the closure's sorted order, so equal closures give equal files.
pub fn sql(closure: &Closure, registration_time: u64) -> String {
    let mut s = String::from("pragma page_size = 4096;\nbegin;\n");
    s.push_str(SCHEMA);
    let id = |p: &str| closure.paths.binary_search_by(|x| x.path.as_str().cmp(p)).map(|i| i + 1);
    for (i, p) in closure.paths.iter().enumerate() {
        let deriver = p.deriver.as_deref().map_or("null".to_owned(), quote);
        s.push_str(&format!(
            "insert into ValidPaths (id, path, hash, registrationTime, deriver, narSize) values ({}, {}, {}, {registration_time}, {deriver}, {});\n",
            i + 1,
            quote(&p.path),
            quote(&p.nar_hash),
            p.nar_size
        ));
    }
    for (i, p) in closure.paths.iter().enumerate() {
        for r in &p.references {
            if let Ok(j) = id(r) {
                s.push_str(&format!("insert into Refs values ({}, {j});\n", i + 1));
            }
        }
    }
    s.push_str("commit;\n");
    s
}

/// Writes `<db_dir>/db.sqlite` and `<db_dir>/schema`.
pub fn write(db_dir: &Path, closure: &Closure, registration_time: u64) -> Result<()> {
    std::fs::write(db_dir.join("schema"), SCHEMA_VERSION).map_err(|e| Error::io(db_dir.join("schema"), e))?;
    let db = db_dir.join("db.sqlite");
    let mut child = Command::new("sqlite3")
        .arg("-bail")
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::new(format!("cannot run sqlite3: {e}")).hint("install sqlite3 (Debian: sqlite3, Nix: sqlite)")
        })?;
    let text = sql(closure, registration_time);
    let fed = child.stdin.take().map(|mut i| i.write_all(text.as_bytes()));
    let out = child.wait_with_output().map_err(|e| Error::new(format!("sqlite3: {e}")))?;
    if !out.status.success() || !matches!(fed, Some(Ok(()))) {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Error::new(format!("sqlite3 could not write the Nix database: {}", err.trim())));
    }
    // Modes as Nix leaves them, whatever the builder's umask.
    for f in [db, db_dir.join("schema")] {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).map_err(|e| Error::io(&f, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::closure::parse_registration;
    use super::*;

    const H: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn rows_follow_sorted_paths_and_references_use_their_ids() {
        let reg = format!("/s/b\n{H}\n7\n/s/b.drv\n2\n/s/a\n/s/b\n/s/a\n{H}\n5\n\n0\n");
        let s = sql(&parse_registration(&reg).unwrap(), 1);
        let a = s.find("values (1, '/s/a', ").unwrap();
        let b = s.find("values (2, '/s/b', ").unwrap();
        assert!(a < b);
        assert!(s.contains(&format!("(1, '/s/a', '{H}', 1, null, 5)")));
        assert!(s.contains(&format!("(2, '/s/b', '{H}', 1, '/s/b.drv', 7)")));
        assert!(s.contains("insert into Refs values (2, 1);\ninsert into Refs values (2, 2);"));
    }

    #[test]
    fn quotes_are_doubled() {
        assert_eq!(quote("a'b"), "'a''b'");
    }
}
