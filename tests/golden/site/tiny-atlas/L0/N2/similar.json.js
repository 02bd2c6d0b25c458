(window.ATLAS_DATA=window.ATLAS_DATA||{})["similar"]={"kind":"similar","model":"tiny-atlas","path":"tiny-atlas/L0/N2/","rows":"eNoDAAAAAAE=","schema_version":1,"text":"eNqLjgUAARUAuQ=="};
